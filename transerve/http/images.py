"""Image parts of chat messages and Responses input: read from the request, fetched and decoded before
the request reaches the engine, so a bad image is a 400 that names it and costs the engine nothing.

Chat sends {"type": "image_url", "image_url": {"url": ...}}; Responses sends {"type": "input_image",
"image_url": ...}. Both become {"type": "image"} parts for the chat template (the image's place in the
conversation), and the decoded images travel beside the messages, in order.
"""

from __future__ import annotations

from typing import Any

from transerve.http.errors import OpenAIError
from transerve.media.images import MAX_IMAGES_PER_REQUEST, MediaError, load_image

IMAGE_PART_TYPES = ("image_url", "input_image")


def has_image_parts(content: list) -> bool:
    return any(isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES for part in content)


def image_content(content: list, param: str) -> list[dict[str, Any]]:
    """A message's content parts, checked: text parts and image parts (each with its URL and param)."""
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        where = f"{param}[{j}]"
        if kind in ("text", "input_text", "output_text"):
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            parts.append({"type": "image", "url": url, "param": f"{where}.image_url"})
        elif kind == "input_image":
            if part.get("file_id") is not None and part.get("image_url") is None:
                raise OpenAIError(f"{where}: images by file_id are not supported (no files are stored); send image_url",
                                  400, f"{where}.file_id")
            parts.append({"type": "image", "url": part.get("image_url"), "param": f"{where}.image_url"})
        else:
            raise OpenAIError(f"{where}: content parts of type {kind!r} are not supported", 400, param)
    return parts


async def load_message_images(messages: list[dict[str, Any]], engine, param: str | None = None) -> tuple[list, tuple]:
    """(messages for the chat template, the decoded images in order). `param` overrides the field that
    errors name (Responses reports `input`, not the chat messages it was turned into)."""
    found = [(i, j, part) for i, m in enumerate(messages) if isinstance(m.get("content"), list)
             for j, part in enumerate(m["content"]) if part.get("type") == "image"]
    if not found:
        return messages, ()
    first_param = param or found[0][2]["param"]
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
            raise OpenAIError(str(exc), 400, param or exc.param, code="invalid_image") from exc
    out = [{**m, "content": [p if p["type"] != "image" else {"type": "image"} for p in m["content"]]}
           if isinstance(m.get("content"), list) else m for m in messages]
    return out, tuple(images)
