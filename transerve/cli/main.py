"""The `transerve` command: serve, cluster, download, chat."""

from __future__ import annotations

import argparse
import os
import sys

from transerve.config import QUANTIZATION_MODES
from transerve.engine.models import DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transerve", description="An OpenAI-compatible server for Hugging Face transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    serve.add_argument("model", nargs="?", default=None,
                       help="serve this model for every request: repo id[@revision], local directory, file.gguf or "
                            "repo:file.gguf. Without it, each request's `model` is loaded from the HF cache on first use")
    serve.add_argument("--force-model", default=None, help="the same as MODEL")
    serve.add_argument("--model-timeout", type=float, default=300.0,
                       help="unload a model (not the pinned MODEL) after this many idle seconds; 0 or less: never "
                            "(default: 300)")
    serve.add_argument("--no-preload", action="store_true",
                       help=f"without MODEL, do not load {DEFAULT_MODEL} at start (it still loads on first use)")
    serve.add_argument("--host", default="localhost", help="address to bind (default: localhost)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                       help="weights and KV cache dtype (default: bfloat16 on CUDA, float32 on CPU)")
    serve.add_argument("--max-num-seqs", type=int, default=None,
                       help="most requests in one batch (default: 64 on CPU, 256 on CUDA)")
    serve.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="token budget of one step; longer prompts are prefilled in chunks (default: 1024 on CPU, 8192 on CUDA)")
    serve.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                       help="schedule the next step while the model runs this one, so host work overlaps the "
                            "model; the same tokens either way (default: on)")
    serve.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default: 16)")
    serve.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache blocks (default: sized from memory)")
    serve.add_argument("--gpu-memory-utilization", "--memory-fraction", dest="memory_fraction", type=float, default=0.9,
                       help="fraction of device memory for model and KV cache when --num-kv-blocks is not set (default: 0.9)")
    serve.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                       help="KV cache dtype; other than the weights' on CPU only (default: auto, the weights' dtype)")
    serve.add_argument("--no-prefix-caching", action="store_true", help="do not reuse the KV cache of shared prompt prefixes")
    serve.add_argument("--enforce-eager", action="store_true",
                       help="run decode steps eagerly: no CUDA graphs on CUDA; on CPU, no compiled decode steps (by "
                            "default a background process compiles them while steps run eagerly, saved under "
                            "~/.cache/transerve/decode-steps for later starts)")
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                       help="split MODEL over this many GPUs of this box (cuda:0..N-1), or CPU processes with "
                            "--device cpu (default: 1)")
    serve.add_argument("--quantization", default="auto", choices=QUANTIZATION_MODES,
                       help="CPU weights: auto (default) keeps a GGUF's Q4_0/Q4_1/Q8_0 weights as the file's blocks "
                            "where the C++ kernels build, else float; none runs float (a GGUF dequantized); gguf "
                            "insists on the file's blocks; int8 also makes a float model's linears Q8_0")
    serve.add_argument("--override-generation-config", default=None, metavar="JSON",
                       help="sampling defaults for every model, over each model's generation_config.json, as a JSON "
                            "object of temperature, top_p, top_k, min_p: '{\"temperature\": 0.7}' (default: none)")
    serve.add_argument("--trust-remote-code", action="store_true", help="allow models that run their own code")
    serve.add_argument("--max-queued-requests", type=int, default=512,
                       help="requests that may wait beyond a full batch; past that, 429 with Retry-After (default: 512)")
    serve.add_argument("--api-key", default=os.environ.get("TRANSERVE_API_KEY") or None,
                       help="require `Authorization: Bearer KEY` on all but /health, /metrics, /openapi.json and the "
                            "playground page (which asks for the key) "
                            "(default: $TRANSERVE_API_KEY; prefer the variable, command lines are visible to other users)")
    serve.add_argument("--allowed-origins", default="",
                       help="CORS: comma-separated origins (https://app.example.com) that browsers may call from, "
                            "or '*' (default: none)")
    serve.add_argument("--max-request-bytes", type=int, default=64 * 1024 * 1024,
                       help="largest request body; larger ones get 413 (default: 67108864, 64 MiB)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM or Ctrl-C, seconds that in-flight requests get to finish (default: 30)")
    serve.add_argument("--no-playground", action="store_true", help="do not serve the web playground at /")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])

    from transerve.cli.cluster import add_cluster_parser

    add_cluster_parser(sub, serve)

    download = sub.add_parser("download", help="download a model into the Hugging Face cache")
    download.add_argument("repo_id", help="owner/name[@revision], or owner/name:file.gguf")

    chat = sub.add_parser("chat", help="chat in the terminal with any OpenAI-compatible server")
    chat.add_argument("url", nargs="?", default="http://localhost:8000",
                      help="the server's address, or its /v1 URL (default: http://localhost:8000)")
    chat.add_argument("--model", default=None, help="model to ask for (default: the server's first)")
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--max-tokens", type=int, default=None, help="longest answer in tokens (default: the server's)")
    chat.add_argument("--api-key", default=os.environ.get("TRANSERVE_API_KEY") or "none",
                      help="the server's API key (default: $TRANSERVE_API_KEY)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from transerve.cli.serve import run_serve

        return run_serve(args)
    if args.command == "cluster":
        from transerve.cli.cluster import run_cluster

        return run_cluster(args)
    if args.command == "download":
        from transerve.cli.download import run_download

        return run_download(args.repo_id)
    from transerve.cli.chat import run_chat

    return run_chat(args)


if __name__ == "__main__":
    sys.exit(main())
