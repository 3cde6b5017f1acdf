"""What quantized weights cost in quality: perplexity and greedy agreement, float32 vs each mode.

    PYTHONPATH=. python bench/quality.py                              # SmolLM2-135M-Instruct (its GGUF)
    PYTHONPATH=. python bench/quality.py --model ./my-model --modes none int8

Each mode loads the model as the server does (engine/quantize.py `quantize_model` over the same weights;
attention is sdpa here, since no paged batch is needed), then measures:
- perplexity over the first --tokens tokens of bench/data/opticks.txt (Newton's Opticks, public domain), in
  one forward, or fed --chunk tokens at a time through the KV cache (decode-sized passes, as the server's
  steps are);
- greedy agreement with the reference mode (`none`: float32; for a GGUF, the file dequantized to float32)
  over 20 chat prompts of --max-tokens tokens each: the share of positions whose token is the same.
A mode whose perplexity rises more than 3% over the reference, or that agrees on fewer than 95% of the
tokens, is flagged: it should not be a default.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from transerve.engine import models  # noqa: E402
from transerve.engine.quantize import quantize_model  # noqa: E402

TEXT = Path(__file__).resolve().parent / "data" / "opticks.txt"
PROMPTS = [
    "What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
    "Write a haiku about the sea.", "What is 12 times 7?", "Explain what a prime number is.",
    "Give me a tip for sleeping better.", "Who wrote Romeo and Juliet?", "What does a thermometer measure?",
    "Translate 'good morning' into Spanish.", "Why is the sky blue?", "List three fruits that are red.",
    "What is the boiling point of water in Celsius?", "Describe a cat in one sentence.",
    "What is photosynthesis?", "Suggest a name for a pet goldfish.", "How do I make a cup of tea?",
    "What is the largest planet in the solar system?", "Write one sentence about autumn.",
    "What is the opposite of 'ancient'?",
]
PPL_LIMIT, AGREEMENT_LIMIT = 1.03, 0.95


def load(path: str, mode: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, quantize_model(model, mode, path, torch.device("cpu"), torch.float32)


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, chunk: int | None = None) -> float:
    if not chunk:
        return model(ids, labels=ids).loss.exp().item()
    past, logits = None, []
    for start in range(0, ids.shape[1], chunk):
        out = model(ids[:, start:start + chunk], past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[0])
    return torch.nn.functional.cross_entropy(torch.cat(logits)[:-1], ids[0, 1:]).exp().item()


@torch.inference_mode()
def greedy(model, tokenizer, max_tokens: int) -> list[list[int]]:
    answers = []
    for prompt in PROMPTS:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        answers.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    return answers


def agreement(answers: list[list[int]], reference: list[list[int]]) -> tuple[float, int]:
    """(share of positions with the same token, prompts answered identically)."""
    same = sum(a == b for x, y in zip(answers, reference) for a, b in zip(x, y))
    return same / sum(len(y) for y in reference), sum(x == y for x, y in zip(answers, reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--modes", nargs="+", default=None, help="default: none gguf (GGUF), none int8 (others)")
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=None, help="perplexity fed this many tokens at a time")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    resolved = models.resolve(args.model)
    path = models.materialize(resolved)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids[:, : args.tokens]
    modes = args.modes or (["none", "gguf"] if resolved.gguf_file else ["none", "int8"])
    runs = ["none"] + [m for m in modes if m != "none"]
    fed = f", {args.chunk} at a time" if args.chunk else ""
    print(f"{args.model}: perplexity over {ids.shape[1]} tokens of {TEXT.name}{fed}; greedy agreement over "
          f"{len(PROMPTS)} prompts x {args.max_tokens} tokens; {torch.get_num_threads()} threads", flush=True)
    header = f"{'mode':>6} {'precision':>12} {'perplexity':>10} {'vs ref':>7} {'tokens same':>11} {'prompts same':>12} {'s':>5}  flag"
    print(header + "\n" + "-" * len(header), flush=True)
    reference_ppl, reference = None, None
    for mode in runs:
        start = time.perf_counter()
        model, precision = load(path, mode)
        ppl = perplexity(model, ids, args.chunk)
        answers = greedy(model, tokenizer, args.max_tokens)
        if reference is None:
            reference_ppl, reference = ppl, answers
        share, prompts_same = agreement(answers, reference)
        rise = ppl / reference_ppl
        flag = "" if rise <= PPL_LIMIT and share >= AGREEMENT_LIMIT else "NOT A DEFAULT"
        print(f"{mode:>6} {precision:>12} {ppl:>10.3f} {rise - 1:>+7.1%} {share:>11.1%} "
              f"{prompts_same:>9}/{len(PROMPTS)} {time.perf_counter() - start:>5.0f}  {flag}", flush=True)
        del model


if __name__ == "__main__":
    main()
