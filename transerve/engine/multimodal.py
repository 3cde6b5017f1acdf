"""Images in the paged engine: what a prompt's images are, and how a step's embeddings and positions use them.

A request with images carries a `MultimodalPrompt` as opaque payload through the engine core. Each image
covers a run of placeholder tokens in the prompt; the vision tower turns the image into exactly one
embedding row per placeholder. At prefill, a chunk's placeholder rows are taken from those embeddings
(computed once per image and kept in a bounded cache keyed by the image's content hash, so a prompt
prefilled in several chunks, or recomputed after preemption, runs the vision tower once) and written
over the token embeddings. Qwen2-VL style models rotate with 3-D (M-RoPE) positions: inside the prompt
they come from the model's `get_rope_index`; after it every position is the text position plus a delta.

Text-only models never build a `MultimodalRunner`; on a VLM, steps without image requests return at once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# How many embedding rows the encoder cache keeps (a 1024x1024 image is ~1.3k rows for Qwen2-VL).
ENCODER_CACHE_ROWS = 32768


@dataclass(frozen=True, eq=False)
class ImageInput:
    content_hash: str  # of what the vision tower sees: keys the encoder cache and the KV block hashes
    offset: int  # prompt position of the image's first placeholder token
    length: int  # its placeholder tokens, contiguous; the vision tower gives one row per token
    encoder_inputs: dict[str, torch.Tensor]  # this image's share of the processor output


@dataclass(frozen=True, eq=False)
class MultimodalPrompt:
    images: tuple[ImageInput, ...]
    prompt_len: int
    mrope_positions: torch.Tensor | None = None  # [3, prompt_len] for M-RoPE models, else None
    mrope_delta: int = 0  # M-RoPE position minus text position, for every token after the prompt

    def image_hashes_in(self, start: int, end: int) -> tuple[str, ...]:
        """Hashes of the images whose placeholders overlap [start, end): part of a KV block's identity,
        since placeholder tokens are the same for every image."""
        return tuple(img.content_hash for img in self.images if img.offset < end and img.offset + img.length > start)


def is_vision_language(config) -> bool:
    """A model that transformers loads as image-text-to-text and not as a plain causal LM."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    kind = config.model_type
    return kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def vision_feature_kwargs(config) -> dict:
    """LLaVA-style models pick the vision layer and drop CLS by config; get_image_features wants them given."""
    return {name: getattr(config, name) for name in ("vision_feature_layer", "vision_feature_select_strategy")
            if getattr(config, name, None) is not None}


def image_embeddings(model, image: ImageInput, feature_kwargs: dict) -> torch.Tensor:
    """The vision tower and projector on one image: [placeholder tokens, hidden]."""
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in image.encoder_inputs.items()}
    out = model.get_image_features(**inputs, **feature_kwargs)
    # transformers 5.x returns a model output whose pooler_output is the per-image split; older ones a
    # tensor or a tuple of tensors.
    features = getattr(out, "pooler_output", out)
    if isinstance(features, (list, tuple)):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    features = features.reshape(-1, features.shape[-1])
    if features.shape[0] != image.length:
        raise ValueError(f"the vision tower gave {features.shape[0]} rows for an image of {image.length} placeholder tokens")
    return features.to(dtype)


class MultimodalRunner:
    """The image half of a VLM's step: encoder cache, embeddings merge, M-RoPE positions."""

    def __init__(self, model, max_cached_rows: int = ENCODER_CACHE_ROWS) -> None:
        self.model = model
        self.embed_tokens = model.get_input_embeddings()
        self.feature_kwargs = vision_feature_kwargs(model.config)
        self.max_cached_rows = max_cached_rows
        self.encoder_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cached_rows = 0
        self.num_encoder_runs = 0  # read by tests: the vision tower runs once per distinct image

    def embeddings(self, image: ImageInput) -> torch.Tensor:
        rows = self.encoder_cache.get(image.content_hash)
        if rows is not None:
            self.encoder_cache.move_to_end(image.content_hash)
            return rows
        rows = image_embeddings(self.model, image, self.feature_kwargs)
        self.num_encoder_runs += 1
        self.encoder_cache[image.content_hash] = rows
        self.cached_rows += rows.shape[0]
        while self.cached_rows > self.max_cached_rows:  # the rows returned stay valid for this step
            _, evicted = self.encoder_cache.popitem(last=False)
            self.cached_rows -= evicted.shape[0]
        return rows

    def step_inputs(self, chunks, input_ids: list[int], positions: list[int], device: torch.device):
        """Adjust a packed step for its image requests; `chunks` are its (request state, start, tokens) in
        packing order (engine/batch.py).

        Returns (positions, model inputs or None). Decode positions of M-RoPE requests are shifted in the
        list, which keeps pure decode steps on the ordinary path (CUDA graphs included). A step with a
        prompt chunk of an image request returns the model inputs to use instead of input_ids/position_ids:
        inputs_embeds when a chunk covers placeholders, 3-D position_ids when a chunk is of an M-RoPE prompt.
        """
        merges: list[tuple[int, int, torch.Tensor]] = []  # (packed row, rows) pairs to overwrite
        mrope_chunks: list[tuple[int, int, MultimodalPrompt, int]] = []  # (packed row, start, prompt, n)
        row = 0
        for state, start, n in chunks:
            prompt = state.multimodal
            if prompt is not None:
                end = start + n
                if start < prompt.prompt_len:
                    for image in prompt.images:
                        lo, hi = max(start, image.offset), min(end, image.offset + image.length)
                        if lo < hi:
                            rows = self.embeddings(image)[lo - image.offset:hi - image.offset]
                            merges.append((row + lo - start, rows))
                    if prompt.mrope_positions is not None:
                        mrope_chunks.append((row, start, prompt, n))
                elif prompt.mrope_delta:
                    for i in range(row, row + n):
                        positions[i] += prompt.mrope_delta
            row += n
        if not merges and not mrope_chunks:
            return positions, None
        ids = torch.tensor([input_ids], dtype=torch.int64, device=device)
        if mrope_chunks:
            position_ids = torch.tensor(positions, dtype=torch.int64).expand(3, -1).clone()
            for packed, start, prompt, n in mrope_chunks:
                position_ids[:, packed:packed + n] = mrope_slice(prompt, start, n)
            inputs = {"position_ids": position_ids[:, None, :].to(device)}
        else:
            inputs = {"position_ids": torch.tensor(positions, dtype=torch.int64, device=device)[None]}
        if merges:
            embeds = self.embed_tokens(ids)
            for packed, rows in merges:
                embeds[0, packed:packed + rows.shape[0]] = rows.to(embeds.dtype)
            inputs["inputs_embeds"] = embeds
        else:
            inputs["input_ids"] = ids
        return positions, inputs


def mrope_slice(prompt: MultimodalPrompt, start: int, n: int) -> torch.Tensor:
    """[3, n] M-RoPE positions of tokens start..start+n: the prompt's table, then text position + delta."""
    in_prompt = min(n, prompt.prompt_len - start)
    after = torch.arange(start + in_prompt, start + n, dtype=torch.int64) + prompt.mrope_delta
    return torch.cat([prompt.mrope_positions[:, start:start + in_prompt], after.expand(3, -1)], dim=1)
