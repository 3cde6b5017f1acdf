"""`transerve download REPO_ID`: fill the Hugging Face cache, with a progress bar."""

from __future__ import annotations

import sys

from transerve.engine.models import split_revision


def run_download(spec: str) -> int:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    name, revision = split_revision(spec)
    patterns = None
    if ":" in name:
        name, gguf_file = name.split(":", 1)
        patterns = [gguf_file, "*.json", "*.model", "*.txt", "*.jinja"]
    try:
        path = snapshot_download(name, revision=revision, allow_patterns=patterns)
    except RepositoryNotFoundError:
        print(f"error: {name} does not exist on the Hugging Face hub (or needs a token: `hf auth login`)", file=sys.stderr)
        return 1
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: cannot download {spec}: the Hugging Face hub could not be reached ({reason})", file=sys.stderr)
        return 1
    print(path)
    return 0
