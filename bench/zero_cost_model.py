"""A causal LM whose forward is one tiny op, for measuring everything around the model (host overhead).

`ZeroCostForCausalLM` takes the keyword arguments the model runner passes a stock HF model
(`input_ids` [1, tokens], `logits_to_keep` as a tensor of packed positions, `paged_batch`, ...) and returns
`logits` [1, kept, vocab] with a single 1.0 per row: at the token `next_token(current, position)`. No attention,
no KV writes, no weights to speak of. Greedy decoding then walks ordinary merged tokens (never the
specials below FIRST_TOKEN, so never end-of-sequence: requests run to max_tokens).

`build_model_dir(out)` writes a loadable model directory: a Llama config with `auto_map` pointing at this
file (copied in as modeling_zero_cost.py), SmolLM2's tokenizer and chat template, and the weights (one
scalar). `transerve serve DIR --trust-remote-code` then serves it through the whole stock path
(assembly, ModelRunner, actors, HTTP), exactly as it would serve a real remote-code model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

FIRST_TOKEN = 273  # SmolLM2's specials and single bytes lie below: the walk yields whole characters


class ZeroCostForCausalLM(PreTrainedModel):
    config_class = LlamaConfig
    base_model_prefix = "model"
    _supports_attention_backend = True  # accepts attn_implementation="transerve_paged" (and ignores it)

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.one = nn.Parameter(torch.ones(()))  # the runner reads device and dtype off the parameters
        self.post_init()

    def _init_weights(self, module) -> None:
        if module is self:
            with torch.no_grad():
                self.one.fill_(1.0)

    def get_output_embeddings(self):
        return None  # the server then reads the vocabulary size off the config

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: torch.Tensor | int = 0,
                **kwargs) -> CausalLMOutput:
        keep = logits_to_keep if isinstance(logits_to_keep, torch.Tensor) else slice(-1, None)
        current, position = input_ids[0, keep], position_ids[0, keep]
        rows = torch.arange(current.shape[0], device=current.device)
        logits = torch.zeros(1, current.shape[0], self.config.vocab_size, dtype=self.one.dtype, device=current.device)
        logits[0, rows, next_token(current, position, self.config.vocab_size)] = self.one
        return CausalLMOutput(logits=logits)


def next_token(current: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    return (current * 7919 + position * 104729 + 13) % (vocab - FIRST_TOKEN) + FIRST_TOKEN


def model_config(vocab_size: int) -> LlamaConfig:
    """The shapes the runner sizes its (tiny) KV cache from; the model itself has no layers."""
    return LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=vocab_size, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2, architectures=["ZeroCostForCausalLM"],
                       auto_map={"AutoModelForCausalLM": "modeling_zero_cost.ZeroCostForCausalLM"})


def build_model(vocab_size: int) -> ZeroCostForCausalLM:
    return ZeroCostForCausalLM(model_config(vocab_size)).eval()


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from transerve.engine import models

    return AutoTokenizer.from_pretrained(models.materialize(models.resolve(models.DEFAULT_MODEL)))


def build_model_dir(out: Path, vocab_size: int) -> Path:
    """A model directory `transerve serve OUT --trust-remote-code` loads (SmolLM2's tokenizer)."""
    out.mkdir(parents=True, exist_ok=True)
    build_model(vocab_size).save_pretrained(out)
    smollm2_tokenizer().save_pretrained(out)
    shutil.copyfile(__file__, out / "modeling_zero_cost.py")
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_zero_cost.ZeroCostForCausalLM"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
