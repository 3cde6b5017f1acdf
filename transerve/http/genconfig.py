"""`generation_config` in a request body (an object, or a JSON string as the OpenAI SDK's `extra_body`
carries it): transformers `GenerationConfig` fields mapped onto our sampling settings.

A field we do not support is a 400 naming it, unless its value is transformers' default (so the whole
`GenerationConfig().to_dict()` of a plain config is accepted) or it only concerns transformers' own
`generate()` bookkeeping (listed in `_NO_EFFECT`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from transerve.http.errors import OpenAIError

# GenerationConfig field -> (our name, check); the check returns the value to use or raises ValueError.
_SUPPORTED = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "do_sample": "do_sample",
    "repetition_penalty": "repetition_penalty",
    "no_repeat_ngram_size": "no_repeat_ngram_size",
    "num_return_sequences": "n",
    "stop_strings": "stop",
    "eos_token_id": "stop_token_ids",
    "suppress_tokens": "suppress_tokens",
    "bad_words_ids": "bad_words_ids",
}
# Fields with no effect on what a server samples: metadata, and tensors-out options of generate().
_NO_EFFECT = {"transformers_version", "_from_model_config", "pad_token_id", "bos_token_id", "decoder_start_token_id",
              "use_cache", "cache_implementation", "return_dict_in_generate"}

# Values that switch a feature off, whatever the installed transformers' defaults are (older releases
# write these into every to_dict(); newer ones write None).
_NEUTRAL = {"num_beams": 1, "num_beam_groups": 1, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
            "diversity_penalty": 0.0, "length_penalty": 1.0, "encoder_repetition_penalty": 1.0, "early_stopping": False,
            "output_attentions": False, "output_hidden_states": False, "output_scores": False, "output_logits": False,
            "renormalize_logits": False, "remove_invalid_values": False, "min_length": 0, "max_length": 20,
            "encoder_no_repeat_ngram_size": 0, "token_healing": False, "guidance_scale": 1.0, "low_memory": False}


@lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    from transformers import GenerationConfig

    return GenerationConfig().to_dict()


def _int(name: str, value: Any, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise OpenAIError(f"generation_config.{name} must be an integer >= {lo}, got {value!r}", 400, f"generation_config.{name}")
    return value


def _float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise OpenAIError(f"generation_config.{name} must be a number in [{lo}, {hi}], got {value!r}", 400,
                          f"generation_config.{name}")
    return float(value)


def _ids(name: str, value: Any) -> list[int]:
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise OpenAIError(f"generation_config.{name} must be a token id or a list of them", 400, f"generation_config.{name}")
    return ids


def parse_generation_config(value: Any) -> dict[str, Any]:
    """The request's generation_config as overrides in our vocabulary (see params.Sampling)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise OpenAIError(f"generation_config is not valid JSON: {exc}", 400, "generation_config") from exc
    if not isinstance(value, dict):
        raise OpenAIError("generation_config must be an object (or a JSON string of one)", 400, "generation_config")
    defaults = _defaults()
    out: dict[str, Any] = {}
    for name, v in value.items():
        if name in _NO_EFFECT or v is None:
            continue
        if name not in _SUPPORTED:
            if name in defaults and (v == defaults[name] or _NEUTRAL.get(name, _NEUTRAL) == v):
                continue  # a value that asks for nothing
            raise OpenAIError(f"generation_config.{name} is not supported by this server", 400, f"generation_config.{name}",
                              "unsupported_parameter")
        if name in ("max_new_tokens", "num_return_sequences"):
            v = _int(name, v, 1)
        elif name in ("min_new_tokens", "top_k", "no_repeat_ngram_size"):
            v = _int(name, v)
        elif name == "temperature":
            v = _float(name, v, 0.0, 100.0)
        elif name in ("top_p", "min_p"):
            v = _float(name, v, 0.0, 1.0)
        elif name == "repetition_penalty":
            v = _float(name, v, 1e-6, 100.0)
        elif name == "do_sample":
            if not isinstance(v, bool):
                raise OpenAIError("generation_config.do_sample must be true or false", 400, "generation_config.do_sample")
        elif name == "stop_strings":
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
                raise OpenAIError("generation_config.stop_strings must be a string or a list of strings", 400,
                                  "generation_config.stop_strings")
        elif name in ("eos_token_id", "suppress_tokens"):
            v = _ids(name, v)
        elif name == "bad_words_ids":
            if not isinstance(v, list) or not all(isinstance(w, list) and w for w in v):
                raise OpenAIError("generation_config.bad_words_ids must be a list of token id lists", 400,
                                  "generation_config.bad_words_ids")
            v = [_ids(name, w) for w in v]
        out[_SUPPORTED[name]] = v
    return out
