"""Embeddings per second on CPU: transerve's embedding engine (and a live server) against
sentence-transformers' own `encode`, on the same model in the same run.

    python bench/embed_bench.py [--batch 32] [--tokens 256] [--repeats 3] [--threads N] [--no-server]

The model is all-MiniLM-L6-v2's architecture (BERT, 6 layers, width 384, 12 heads, a 30522-word
vocabulary, mean pooling, Normalize) with random weights and a made-up WordPiece vocabulary, built
locally and saved by sentence-transformers itself (nothing is downloaded). Every input is exactly
`--tokens` tokens, [CLS] and [SEP] included. The routes take turns in each repeat (so a busy box slows
them alike); the table shows the median over --repeats, after one warm-up each.
  sentence-transformers   SentenceTransformer.encode(texts, batch_size=--batch)
  transerve engine        engine.embedding: tokenize + embed (what the embedder actor runs)
  transerve server        one POST /v1/embeddings of the batch to `transerve serve MODEL_DIR`
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from transerve.config import EngineConfig  # noqa: E402
from transerve.engine.embedding import embed, load_embedder, pooling_spec, tokenize  # noqa: E402

VOCAB = 30522


def build_minilm(root: Path, max_seq_length: int) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import BertConfig, BertModel, BertTokenizerFast

    hf = root / "bert"
    hf.mkdir(parents=True)
    (hf / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                            + [f"w{i}" for i in range(VOCAB - 5)]) + "\n")
    BertTokenizerFast(str(hf / "vocab.txt"), model_max_length=512).save_pretrained(hf)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, max_position_embeddings=512)).save_pretrained(hf)
    model = SentenceTransformer(modules=[Transformer(str(hf), max_seq_length=max_seq_length), Pooling(384, "mean"),
                                         Normalize()], device="cpu")
    model.save(str(root / "minilm"))
    return root / "minilm"


def start_server(model_dir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "transerve.cli.main", "serve", str(model_dir), "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, server's too")
    parser.add_argument("--no-server", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    model_dir = build_minilm(work, args.tokens)
    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(VOCAB - 5)}" for _ in range(args.tokens - 2)) for _ in range(args.batch)]

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu")
    engine = load_embedder("minilm", str(model_dir), pooling_spec(str(model_dir)), EngineConfig(), torch.device("cpu"),
                           torch.float32)
    assert {len(r) for r in tokenize(engine, texts, None)} == {args.tokens}
    routes = {"sentence-transformers": lambda: st.encode(texts, batch_size=args.batch),
              "transerve engine": lambda: embed(engine, tokenize(engine, texts, None))[0]}
    server = None
    if not args.no_server:
        server, url = start_server(model_dir, args.threads)
        client = httpx.Client(timeout=600)
        routes["transerve server"] = lambda: np.array([d["embedding"] for d in client.post(
            url + "/v1/embeddings", json={"model": str(model_dir), "input": texts}).raise_for_status().json()["data"]])
    try:
        times: dict[str, list[float]] = {name: [] for name in routes}
        vectors = {name: run() for name, run in routes.items()}  # warm-up, and the vectors compared below
        for _ in range(args.repeats):
            for name, run in routes.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    base = statistics.median(times["sentence-transformers"])
    print(f"{args.batch} inputs of {args.tokens} tokens, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| route | s per batch | embeddings/s | vs sentence-transformers | max abs diff |")
    print("|---|---|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        diff = np.abs(vectors[name] - vectors["sentence-transformers"]).max()
        print(f"| {name} | {median:.3f} | {args.batch / median:.2f} | {base / median:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
