"""Server-sent events framing."""

from __future__ import annotations

import json


compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # the JSON of every body we stream


def sse(data: dict | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else compact_json(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"  # the end of an OpenAI stream
