"""Images from requests: `data:` URLs and http(s) URLs, fetched without blocking the event loop and
decoded with Pillow. Every failure is a `MediaError` whose message names the problem and the image."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from urllib.parse import urlsplit

import anyio
import httpx

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # per image, as fetched or decoded from base64
FETCH_TIMEOUT_S = 10.0  # for a whole fetch: a server that trickles bytes cannot hold a request forever
MAX_IMAGES_PER_REQUEST = 16


class MediaError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def describe(url: str) -> str:
    """A URL as error messages show it: data URLs are cut short, they can be megabytes of base64."""
    return url if not url.startswith("data:") else url[:40] + "..."


def decode_data_url(url: str, param: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError(f"{param}: a data URL must look like data:image/png;base64,<base64 data>", param)
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise MediaError(f"{param}: the image is larger than this server's limit of {max_bytes} bytes", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"{param}: the data URL's base64 data is invalid: {exc}", param) from exc


async def fetch_url(url: str, param: str, max_bytes: int = MAX_IMAGE_BYTES, timeout: float = FETCH_TIMEOUT_S) -> bytes:
    """GET an http(s) URL, refusing bodies over max_bytes as they stream in."""
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(timeout):
            async with httpx.AsyncClient(timeout=timeout, follow_redirects=True, max_redirects=5) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise MediaError(f"{param}: fetching the image at {url} failed: HTTP {response.status_code}", param)
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise MediaError(f"{param}: the image at {url} is {declared} bytes, over this server's limit of {max_bytes}", param)
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            raise MediaError(f"{param}: the image at {url} is larger than this server's limit of {max_bytes} bytes", param)
                        chunks.append(chunk)
    except TimeoutError as exc:
        raise MediaError(f"{param}: fetching the image at {url} took longer than {timeout:g} s", param) from exc
    except httpx.HTTPError as exc:
        raise MediaError(f"{param}: could not fetch the image at {url}: {type(exc).__name__}: {exc}", param) from exc
    return b"".join(chunks)


def decode_image(data: bytes, url: str, param: str):
    """Pillow image in RGB, fully decoded (a truncated file fails here, not later in the processor)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except Image.DecompressionBombWarning as exc:
        raise MediaError(f"{param}: the image at {describe(url)} has too many pixels: {exc}", param) from exc
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        raise MediaError(f"{param}: {describe(url)} is not an image Pillow can read ({type(exc).__name__}: {exc})", param) from exc
    return image.convert("RGB")


async def load_image(url: str, param: str, max_bytes: int = MAX_IMAGE_BYTES, timeout: float = FETCH_TIMEOUT_S):
    """The image a request's URL names, decoded in a worker thread."""
    if not isinstance(url, str) or not url:
        raise MediaError(f"{param}: the image URL must be a non-empty string", param)
    scheme = urlsplit(url).scheme.lower() if not url.startswith("data:") else "data"
    if scheme == "data":
        data = decode_data_url(url, param, max_bytes)
    elif scheme in ("http", "https"):
        data = await fetch_url(url, param, max_bytes, timeout)
    else:
        raise MediaError(f"{param}: image URLs must be data:, http: or https: URLs, got {describe(url)!r}", param)
    return await anyio.to_thread.run_sync(decode_image, data, url, param)
