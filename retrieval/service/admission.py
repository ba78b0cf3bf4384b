"""Admission control: what a request must satisfy before the service spends work on it.

The bounded queue itself lives in :mod:`clipsearch.retrieval.service.batching`; this module holds
the per-request checks around it: API key, deadlines, and encoded image bytes. Decoding
(pixel limits, the shared pixel budget) is :mod:`clipsearch.retrieval.service.decoding`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from typing import TYPE_CHECKING

from clipsearch.retrieval.service.errors import ApiError

if TYPE_CHECKING:
    from clipsearch.retrieval.service.config import ServiceConfig

API_KEY_HEADER = "x-api-key"


def api_key_ok(expected: str | None, given: str | None) -> bool:
    """True when no key is configured or ``given`` equals it (constant-time compare)."""
    if expected is None:
        return True
    if given is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


def deadline_for(config: ServiceConfig) -> float:
    """The ``time.monotonic()`` by which a request arriving now must be answered."""
    return time.monotonic() + config.request_timeout_s


def remaining(deadline: float) -> float:
    """Seconds left before ``deadline``; raises the 504 ApiError when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise ApiError(504, "deadline_exceeded", "the request deadline passed before its query ran")
    return left


def decode_base64_image(data: str, config: ServiceConfig, *, field: str) -> bytes:
    """A base64 string (optionally a ``data:image/...;base64,`` URL) -> image bytes.

    Raises 400 ``bad_image`` for invalid base64 and 413 ``image_too_large`` when the
    decoded bytes exceed ``max_image_bytes``.
    """
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(400, "bad_image", f"{field}: data URL must be base64 encoded")
    # Base64 inflates by 4/3: refuse before decoding when it cannot possibly fit.
    if len(data) * 3 // 4 > config.max_image_bytes + 3:
        raise image_too_large(len(data) * 3 // 4, config, field=field)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(
            400, "bad_image", f"{field}: not valid base64 ({e})", details={"field": field}
        ) from e
    check_image_bytes(raw, config, field=field)
    return raw


def image_too_large(size: int, config: ServiceConfig, *, field: str) -> ApiError:
    return ApiError(
        413,
        "image_too_large",
        f"{field}: image is {size:,} bytes; the limit is {config.max_image_bytes:,} bytes. "
        "Downscale or recompress it (a 1024 px JPEG is plenty for search)",
        details={"field": field, "bytes": size, "limit": config.max_image_bytes},
    )


def check_image_bytes(raw: bytes, config: ServiceConfig, *, field: str) -> None:
    if not raw:
        raise ApiError(
            400, "bad_image", f"{field}: image is empty (0 bytes)", details={"field": field}
        )
    if len(raw) > config.max_image_bytes:
        raise image_too_large(len(raw), config, field=field)
