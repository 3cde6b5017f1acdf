"""Image parts of chat messages and Responses input, fetched and decoded before the request reaches the
engine, so a bad image is a 400 that names it and costs the engine nothing.

The protocol models turn chat's {"type": "image_url", ...} and Responses' {"type": "input_image", ...}
into {"type": "image", "url", "param"} parts; here they become {"type": "image"} parts for the chat
template (the image's place in the conversation), and the decoded images travel beside the messages.
"""

from __future__ import annotations

from typing import Any

from transerve.http.errors import OpenAIError
from transerve.media.images import MAX_IMAGES_PER_REQUEST, MediaError, load_image


async def load_message_images(messages: list[dict[str, Any]], engine) -> tuple[list, tuple]:
    """(messages for the chat template, the decoded images in order); errors name the image's part."""
    found = [(i, j, part) for i, m in enumerate(messages) if isinstance(m.get("content"), list)
             for j, part in enumerate(m["content"]) if part.get("type") == "image"]
    if not found:
        return messages, ()
    first_param = found[0][2]["param"]
    if not engine.accepts_images:
        raise OpenAIError(f"the model {engine.model_id} does not accept images: it is not a vision-language model "
                          "transerve can feed images to", 400, first_param, code="image_not_supported")
    if len(found) > MAX_IMAGES_PER_REQUEST:
        raise OpenAIError(f"{len(found)} images in one request; at most {MAX_IMAGES_PER_REQUEST} are allowed", 400, first_param)
    images = []
    for _, _, part in found:
        try:
            images.append(await load_image(part["url"], part["param"]))
        except MediaError as exc:
            raise OpenAIError(str(exc), 400, exc.param, code="invalid_image") from exc
    out = [{**m, "content": [p if p["type"] != "image" else {"type": "image"} for p in m["content"]]}
           if isinstance(m.get("content"), list) else m for m in messages]
    return out, tuple(images)
