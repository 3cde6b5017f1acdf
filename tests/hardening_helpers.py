"""Helpers of the hardening tests: a model whose forward fails on demand, and reading /metrics."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from conftest import save_in_hf_cache, tiny_config

# Lives only in the test's private HF cache, and loads only with --trust-remote-code: the failure it
# injects is reachable from no model a user serves.
FAULTY_MODELING = '''
from transformers import LlamaForCausalLM


class FaultyLlamaForCausalLM(LlamaForCausalLM):
    """A tiny Llama whose forward raises on a magic token or past a position, like a bug or an OOM."""

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        if input_ids is not None and bool((input_ids == self.config.fail_token_id).any()):
            raise RuntimeError("injected failure: magic token")
        if position_ids is not None and int(position_ids.max()) >= self.config.fail_at_position:
            raise RuntimeError("injected failure: position")
        return super().forward(input_ids=input_ids, position_ids=position_ids, **kwargs)
'''

MAGIC_PROMPT = "Please say zebra"
FAIL_AT_POSITION = 64


def make_faulty_repo(tokenizer, work: Path) -> Path:
    """tiny/faulty in the private HF cache: fails on the last token of MAGIC_PROMPT, or at FAIL_AT_POSITION."""
    from transformers import LlamaForCausalLM

    config = tiny_config("llama", len(tokenizer))
    config.auto_map = {"AutoModelForCausalLM": "modeling_faulty.FaultyLlamaForCausalLM"}
    config.fail_token_id = tokenizer(MAGIC_PROMPT, add_special_tokens=False)["input_ids"][-1]
    config.fail_at_position = FAIL_AT_POSITION
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(work)
    tokenizer.save_pretrained(work)
    (work / "modeling_faulty.py").write_text(FAULTY_MODELING)
    return save_in_hf_cache("tiny/faulty", work)


def metrics(base_url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, keyed by (name, labels)."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(base_url: str, name: str, **labels: str) -> float:
    return metrics(base_url).get((name, frozenset(labels.items())), 0.0)


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
