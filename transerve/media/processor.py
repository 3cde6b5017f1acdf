"""A VLM's prompts with images: chat template, the model's own processor, and the engine's view of
each image (its placeholder run, its content hash, its share of the processor output, M-RoPE positions).

Runs in the tokenizer actor's worker thread. The processor is the model's `AutoProcessor`. Where that
cannot load because a part the images do not need is missing (Qwen2-VL's video processor needs
torchvision), the model's image processor (Pillow backend) is used with the same placeholder rule as
the processor's: each image token becomes grid_t * grid_h * grid_w / merge_size**2 tokens.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from typing import Any

import torch

from transerve.engine.multimodal import ImageInput, MultimodalPrompt
from transerve.media.errors import PromptError

log = logging.getLogger(__name__)


class ImagePrompts:
    def __init__(self, tokenizer, processor, image_processor, image_token_id: int, rope_index=None) -> None:
        self.tokenizer = tokenizer
        self.processor = processor  # None: image_processor and the grid placeholder rule
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        self.chat_template = getattr(processor, "chat_template", None) or tokenizer.chat_template
        self.rope_index = rope_index  # the model's get_rope_index (reads only its config) for M-RoPE models

    @classmethod
    def load(cls, path: str, tokenizer, model, trust_remote_code: bool = False) -> ImagePrompts | None:
        """None when the model's processor cannot prepare images here (its requests with images get a 400)."""
        from transformers import AutoImageProcessor, AutoProcessor

        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is None:
            log.warning("%s names no image token: requests with images will be refused", path)
            return None
        processor = None
        try:
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
            image_processor = processor.image_processor
        except Exception as exc:  # a sub-processor images do not need (video) wants torchvision, or its files
            image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
            if getattr(image_processor, "merge_size", None) is None:
                log.warning("%s: the processor cannot load (%s) and the image processor alone cannot place images: "
                            "requests with images will be refused", path, exc)
                return None
        if processor is not None and getattr(processor, "chat_template", None) and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = processor.chat_template  # text-only requests render with it too
        rope_index = getattr(getattr(model, "model", None), "get_rope_index", None)
        return cls(tokenizer, processor, image_processor, image_token_id, rope_index)

    def render(self, messages: list[dict[str, Any]], template_kwargs: dict) -> str:
        # VLM templates loop over content parts, and some (llava-hf's) render nothing for a plain string:
        # every string content becomes one text part, whatever the role, images or not.
        parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
                 for m in messages]
        try:
            return self.tokenizer.apply_chat_template(parts, chat_template=self.chat_template, add_generation_prompt=True,
                                                      tokenize=False, **template_kwargs)
        except Exception as exc:
            raise PromptError(f"the chat template rejected these messages: {exc}", "messages") from exc

    def build(self, request) -> tuple[list[int], str, MultimodalPrompt]:
        """A TokenizeRequest with images -> (prompt ids, prompt text, the engine's MultimodalPrompt)."""
        kwargs = dict(request.chat_template_kwargs)
        if request.tools:
            kwargs["tools"] = list(request.tools)
        text = self.render(list(request.messages), kwargs)
        images = list(request.images)
        if text.count(self.image_token) != len(images):
            raise PromptError(f"the chat template placed {text.count(self.image_token)} image tokens for "
                                 f"{len(images)} images", "messages")
        try:
            if self.processor is not None:
                out = self.processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
            else:
                out = self._process_by_grid(text, images)
        except PromptError:
            raise
        except Exception as exc:  # an image the processor cannot take (too small for its patches, ...)
            raise PromptError(f"the model's processor could not prepare the images: {type(exc).__name__}: {exc}",
                                 "messages") from exc
        ids = out["input_ids"][0]
        encoder_inputs = split_per_image(out, len(images))
        runs = placeholder_runs(ids, self.image_token_id, [image_rows(e, self.image_processor) for e in encoder_inputs])
        image_inputs = tuple(ImageInput(content_hash(e), offset, length, e) for e, (offset, length) in zip(encoder_inputs, runs))
        positions, delta = None, 0
        if self.rope_index is not None:
            positions, delta = mrope_positions(self.rope_index, ids, out["image_grid_thw"], self.image_token_id)
        return ids.tolist(), text, MultimodalPrompt(image_inputs, len(ids), positions, delta)

    def _process_by_grid(self, text: str, images: list) -> dict:
        pixels = self.image_processor(images=images, return_tensors="pt")
        if "image_grid_thw" not in pixels:
            raise PromptError("this model's processor cannot load here, and its image processor gives no patch grid", "messages")
        merge = self.image_processor.merge_size ** 2
        pieces = text.split(self.image_token)
        expanded = pieces[0] + "".join(self.image_token * (int(grid.prod()) // merge) + piece
                                       for grid, piece in zip(pixels["image_grid_thw"], pieces[1:]))
        ids = self.tokenizer(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return {**pixels, "input_ids": ids}


def split_per_image(out, num_images: int) -> list[dict[str, torch.Tensor]]:
    """The processor output cut into each image's own encoder inputs."""
    pixel_values = out["pixel_values"]
    if "image_grid_thw" in out:  # Qwen2-VL family: patches of all images in one tensor, a grid per image
        grids = out["image_grid_thw"]
        chunks = pixel_values.split(grids.prod(-1).tolist())
        return [{"pixel_values": chunks[i], "image_grid_thw": grids[i:i + 1]} for i in range(num_images)]
    if pixel_values.shape[0] == num_images:  # LLaVA family: one tensor per image
        sizes = out.get("image_sizes")
        return [{"pixel_values": pixel_values[i:i + 1], **({"image_sizes": sizes[i:i + 1]} if sizes is not None else {})}
                for i in range(num_images)]
    raise PromptError("images for this model family are not supported yet (its processor splits images in a way "
                         "transerve does not know)", "messages")


def image_rows(encoder_inputs: dict[str, torch.Tensor], image_processor) -> int | None:
    """Placeholder tokens of one image when the processor output says (a patch grid), else None."""
    grid = encoder_inputs.get("image_grid_thw")
    if grid is None:
        return None
    return int(grid.prod()) // image_processor.merge_size ** 2


def placeholder_runs(ids: torch.Tensor, image_token_id: int, rows: list[int | None]) -> list[tuple[int, int]]:
    """(offset, length) of each image's placeholder tokens: consecutive runs, in order."""
    positions = (ids == image_token_id).nonzero().flatten().tolist()
    if not rows:
        return []
    if any(r is None for r in rows):  # equal shares: every image of these families has the same size
        if len(positions) % len(rows):
            raise PromptError(f"{len(positions)} image tokens cannot be shared by {len(rows)} images", "messages")
        rows = [len(positions) // len(rows)] * len(rows)
    if sum(rows) != len(positions):
        raise PromptError(f"the prompt has {len(positions)} image tokens, the images need {sum(rows)}", "messages")
    runs, i = [], 0
    for n in rows:
        offset = positions[i]
        if positions[i + n - 1] != offset + n - 1:
            raise PromptError("an image's placeholder tokens are not contiguous; this model family is not supported",
                                 "messages")
        runs.append((offset, n))
        i += n
    return runs


def content_hash(encoder_inputs: dict[str, torch.Tensor]) -> str:
    """What the vision tower will see, hashed: equal images share encoder outputs and KV blocks."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(encoder_inputs):
        tensor = encoder_inputs[name].contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def mrope_positions(rope_index, ids: torch.Tensor, grids: torch.Tensor, image_token_id: int) -> tuple[torch.Tensor, int]:
    """[3, prompt_len] M-RoPE positions and the delta of later tokens, from the model's own get_rope_index
    (transformers 5.2x asks for mm_token_type_ids, earlier versions find the images from input_ids)."""
    kwargs: dict[str, Any] = {"image_grid_thw": grids}
    if "mm_token_type_ids" in inspect.signature(rope_index).parameters:
        kwargs["mm_token_type_ids"] = (ids[None] == image_token_id).int()
    positions, deltas = rope_index(ids[None], **kwargs)
    return positions[:, 0].clone(), int(deltas.flatten()[0])
