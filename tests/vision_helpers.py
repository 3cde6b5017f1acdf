"""Tiny random vision-language models of two families, with their processors, in the private HF cache;
images to send them; and the oracle: the model's own `generate` on the prompt our processor built.

tiny/qwen2-vl is Qwen2-VL (M-RoPE, a patch grid per image, images of different sizes take different
numbers of tokens), tiny/qwen2.5-vl the same with Qwen2.5-VL's windowed vision tower; tiny/llava is LLaVA-1.5 (a CLIP tower, 1-D RoPE, a fixed number of tokens per image).
Both use SmolLM2's tokenizer with the image tokens added and a small test-owned chat template.
"""

from __future__ import annotations

import base64
import inspect
import io
import json
from pathlib import Path

import numpy as np
import torch

from conftest import save_in_hf_cache

QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for c in m.content %}{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like llava-hf's own templates, it reads content parts only: a plain string content renders nothing.
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m.role | upper }}: "
    "{% for c in m.content %}{% if c.type == 'image' %}<image>\n{% elif c.type == 'text' %}{{ c.text }}{% endif %}"
    "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def build_qwen2_vl(smollm2_dir: str, work: Path) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    return _build_qwen_vl(smollm2_dir, work, "tiny/qwen2-vl", Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision,
                          "Qwen2VLProcessor")


def build_qwen2_5_vl(smollm2_dir: str, work: Path) -> Path:
    """Qwen2.5-VL: Qwen2-VL's prompt and M-RoPE, a windowed-attention vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3, window_size=56, fullatt_block_indexes=[1])
    return _build_qwen_vl(smollm2_dir, work, "tiny/qwen2.5-vl", Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          vision, "Qwen2_5_VLProcessor")


def _build_qwen_vl(smollm2_dir: str, work: Path, name: str, config_class, model_class, vision: dict,
                   processor_class: str) -> Path:
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_TOKENS})
    tokenizer.chat_template = QWEN_TEMPLATE
    start, end, image, video = tokenizer.convert_tokens_to_ids(QWEN_TOKENS)
    config = config_class(
        text_config=dict(**TEXT, vocab_size=len(tokenizer),
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        vision_config=vision, vision_start_token_id=start, vision_end_token_id=end, image_token_id=image,
        video_token_id=video, architectures=[model_class.__name__], tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model_class(config).save_pretrained(work)
    tokenizer.save_pretrained(work)
    # The processor class needs a video processor, which needs torchvision: save its parts and its name.
    pil.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=168 * 168).save_pretrained(work)
    (work / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}))
    return save_in_hf_cache(name, work)


def build_llava(smollm2_dir: str, work: Path) -> Path:
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = LlavaConfig(
        text_config=LlamaConfig(**TEXT, vocab_size=len(tokenizer)).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=56, patch_size=14).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", architectures=["LlavaForConditionalGeneration"],
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(work)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    processor.save_pretrained(work)
    tokenizer.chat_template = LLAVA_TEMPLATE
    tokenizer.save_pretrained(work)
    return save_in_hf_cache("tiny/llava", work)


def random_image(seed: int, size: tuple[int, int] = (64, 64)):
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def image_message(text: str, n_images: int = 1, url: str = "IMAGE") -> list[dict]:
    """A user turn with n image parts then text, in OpenAI's chat shape."""
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(n_images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def reference_model(path: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).eval()


def hf_greedy_with_images(model, prompt, max_new_tokens: int) -> list[int]:
    """transformers' generate on the prompt our processor built: ids, and the images' encoder inputs."""
    ids = torch.tensor([prompt.ids])
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    images = prompt.multimodal.images if prompt.multimodal is not None else ()
    if images:
        for name in images[0].encoder_inputs:
            kwargs[name] = torch.cat([img.encoder_inputs[name] for img in images])
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    with torch.inference_mode():
        out = model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


_built: dict[str, Path] = {}


def vlm_repos(smollm2_dir: str, tmp_path_factory) -> dict[str, Path]:
    """tiny/qwen2-vl, tiny/qwen2.5-vl and tiny/llava, built once per test session."""
    if not _built:
        _built["tiny/qwen2-vl"] = build_qwen2_vl(smollm2_dir, tmp_path_factory.mktemp("qwen2-vl"))
        _built["tiny/qwen2.5-vl"] = build_qwen2_5_vl(smollm2_dir, tmp_path_factory.mktemp("qwen2.5-vl"))
        _built["tiny/llava"] = build_llava(smollm2_dir, tmp_path_factory.mktemp("llava"))
    return _built


class Prompt:
    """A chat prompt as the server's tokenizer actor builds it: ids and the engine's MultimodalPrompt."""

    def __init__(self, path: Path, model, messages: list[dict], images: tuple = ()) -> None:
        from transformers import AutoTokenizer

        from transerve.actors.messages import TokenizeRequest
        from transerve.engine.request import SamplingParams
        from transerve.media.processor import ImagePrompts

        prompts = ImagePrompts.load(str(path), AutoTokenizer.from_pretrained(path), model)
        request = TokenizeRequest("test", SamplingParams(), (), None, messages=tuple(messages), images=images)
        if images:
            self.ids, self.text, self.multimodal = prompts.build(request)
        else:
            self.text = prompts.render(messages, {})
            self.ids, self.multimodal = prompts.tokenizer(self.text, add_special_tokens=False)["input_ids"], None


def template_parts(text: str, n_images: int) -> list[dict]:
    """One user turn as the HTTP layer hands it to the chat template: image parts, then the text."""
    return [{"role": "user", "content": [*([{"type": "image"}] * n_images), {"type": "text", "text": text}]}]
