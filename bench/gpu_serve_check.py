"""A live `transerve serve` on the GPU, driven by real clients: the `openai` SDK, then bench/serve_load.py.

No weights can reach the GPU box, so the model is Qwen2.5-0.5B-shaped with random bfloat16 weights and
SmolLM2's tokenizer (saved beside this script's caller with `--save-tokenizer`). The text is noise;
what is checked is the whole path on CUDA (HTTP, actors, scheduler, Triton kernels, CUDA graphs), that
every answer has the length asked for, that bad input gets a 400 while the server keeps serving, that
SIGTERM stops it, and the throughput at several concurrencies.

    python bench/gpu_serve_check.py --save-tokenizer .gpu_assets/tokenizer      # here, once (needs the GGUF;
                                                                                 # a run here without it saves it first)
    python bench/gpu_serve_check.py --tokenizer .gpu_assets/tokenizer --out-dir /tmp/serve   # on the GPU box
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def save_tokenizer(dest: str) -> None:
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO_ROOT))
    from transerve.engine import models

    AutoTokenizer.from_pretrained(models.materialize(models.resolve(models.DEFAULT_MODEL))).save_pretrained(dest)
    print(f"tokenizer saved in {dest}")


def build_model_dir(tokenizer_dir: str, dest: Path, device: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864)
    if device == "cpu":  # a dry run of this script
        shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    config = Qwen2Config(**shape, vocab_size=len(tokenizer), max_position_embeddings=4096,
                         tie_word_embeddings=True, rope_theta=1000000.0, architectures=["Qwen2ForCausalLM"],
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before /health answered")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"/health did not answer within {timeout} s")


def client_checks(base: str) -> list[str]:
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    lines = []
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    t0 = time.perf_counter()
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=64,
                                           extra_body={"ignore_eos": True}, temperature=0)
    lines.append(f"chat (plain): {plain.usage.completion_tokens} tokens in {time.perf_counter() - t0:.2f} s, "
                 f"finish {plain.choices[0].finish_reason}")
    assert plain.usage.completion_tokens == 64 and plain.choices[0].finish_reason == "length", plain
    again = client.chat.completions.create(model=model, messages=messages, max_tokens=64,
                                           extra_body={"ignore_eos": True}, temperature=0)
    assert again.choices[0].message.content == plain.choices[0].message.content, "greedy answers differ"
    lines.append("chat (plain, repeated): the same greedy text")
    pieces, usage = [], None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=64, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}, temperature=0):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(pieces) == plain.choices[0].message.content, "streamed greedy text differs from plain"
    lines.append(f"chat (stream): {len(pieces)} content chunks, usage {usage.completion_tokens} tokens, same text")
    sampled = client.completions.create(model=model, prompt="Once upon a time", max_tokens=32, temperature=0.8,
                                        top_p=0.9, seed=7, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in sampled.choices] == [0, 1] and sampled.usage.completion_tokens == 64, sampled
    lines.append("completions (temperature 0.8, top_p 0.9, n=2): 2 choices, 64 tokens")
    scored = client.chat.completions.create(model=model, messages=messages, max_tokens=8, logprobs=True, top_logprobs=3,
                                            extra_body={"ignore_eos": True}, temperature=0)
    content = scored.choices[0].logprobs.content
    assert len(content) == 8 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content), scored
    lines.append("chat (logprobs, top_logprobs=3): 8 tokens scored")
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}
    # A random model only calls a tool when made to: "required" is enforced by the grammar (xgrammar on the GPU).
    called = client.chat.completions.create(model=model, messages=messages, max_tokens=128, tools=[weather],
                                            tool_choice="required", temperature=0)
    calls = called.choices[0].message.tool_calls or []
    assert calls and calls[0].function.name == "get_weather" and "city" in json.loads(calls[0].function.arguments), called
    lines.append(f"chat (tools, tool_choice=required): get_weather({json.loads(calls[0].function.arguments)}), "
                 f"finish {called.choices[0].finish_reason}")
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=-3)
        raise AssertionError("max_tokens=-3 was accepted")
    except BadRequestError as e:
        lines.append(f"bad input: 400 {e.body.get('message', e.body)!s:.80}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-tokenizer", metavar="DIR")
    p.add_argument("--tokenizer", default=str(REPO_ROOT / ".gpu_assets" / "tokenizer"))
    p.add_argument("--out-dir", default="/tmp/gpu_serve_check")
    p.add_argument("--model-dir", default="/tmp/gpu_serve_model",
                   help="where the random model is saved (1 GB: kept out of --out-dir, whose logs travel back)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--device", default="cuda", help="cpu: a dry run with a tiny model")
    p.add_argument("--load-args", default=os.environ.get("LOAD_ARGS"),
                   help="bench/serve_load.py's arguments (default: concurrency 1/32/256 on CUDA, 1/4 in a CPU dry run)")
    args = p.parse_args()
    if args.load_args is None:
        args.load_args = ("--concurrency 1 32 256 --num-requests 4 64 512 --max-tokens 256 --warmup 4" if args.device != "cpu"
                          else "--concurrency 1 4 --num-requests 2 4 --max-tokens 16 --warmup 1")
    if args.save_tokenizer:
        save_tokenizer(args.save_tokenizer)
        return 0

    if not Path(args.tokenizer, "tokenizer_config.json").exists():
        # Here (the GGUF installed) it is saved now; on the GPU box it must have travelled with the checkout.
        try:
            save_tokenizer(args.tokenizer)
        except Exception as exc:
            raise SystemExit(f"no tokenizer in {args.tokenizer} and it cannot be made here ({exc}); "
                             f"run `python bench/gpu_serve_check.py --save-tokenizer {args.tokenizer}` where the GGUF is installed")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir)
    t0 = time.monotonic()
    build_model_dir(args.tokenizer, model_dir, args.device)
    print(f"model built in {time.monotonic() - t0:.1f} s", flush=True)

    base = f"http://127.0.0.1:{args.port}"
    env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    log = open(out / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "transerve.cli.main", "serve", str(model_dir), "--device", args.device,
                             "--port", str(args.port), "--max-num-seqs", "256", "--max-model-len", "2048"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        print(f"server healthy after {wait_healthy(base, proc, 240):.1f} s", flush=True)
        for line in client_checks(base):
            print(line, flush=True)
        load = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "serve_load.py"), "--base-url", f"{base}/v1",
                               "--label", f"transerve ({args.device})", "--ignore-eos", "--json-out", str(out / "load.json"),
                               *args.load_args.split()], env=env, timeout=400)
        if load.returncode:
            print(f"serve_load exited with {load.returncode}")
            return 1
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        print("\n".join(line for line in metrics.splitlines() if line.startswith("transerve_") and "_bucket" not in line)[:3000])
    finally:
        t_stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
            print(f"SIGTERM: server exited with {proc.returncode} after {time.monotonic() - t_stop:.1f} s")
        except subprocess.TimeoutExpired:
            proc.kill()
            print("SIGTERM: server did not exit within 40 s (killed)")
        log.close()
        print("--- server log tail ---\n" + "".join(open(out / "server.log").readlines()[-30:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
