"""What models exist, which work offline, what one is made of, and fetching weights.

The library side of ``clipsearch models list|info|fetch`` and ``clipsearch embed``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.retrieval.encoders import PRESETS, is_fake, load_encoder, resolve_model_name
from clipsearch.retrieval.encoders.base import Encoder
from clipsearch.retrieval.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One row of ``clipsearch models list``."""

    # What to pass as --model (a preset name or an open_clip architecture).
    name: str
    # The open_clip architecture behind it.
    arch: str
    # What to pass as --pretrained ("bundled", a tag, or an hf-hub: id).
    pretrained: str
    # "preset", "bundled", "open_clip" (tag known to open_clip) or "hf-cache" (hub repo found in cache).
    source: str
    # True when the weights are on this machine (bundled or in a local cache).
    offline: bool
    # One line for people.
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.arch,
            "pretrained": self.pretrained,
            "source": self.source,
            "offline": self.offline,
            "description": self.description,
        }


def list_models(*, cache_dir: str | None = None) -> list[ModelEntry]:
    """Presets, bundled models, every open_clip (architecture, tag) pair, and cached hub models."""
    import open_clip

    from clipsearch.retrieval.encoders.weights import is_available_offline
    from clipsearch.retrieval.models import register

    bundled = register()
    rows = [
        ModelEntry(
            name=name,
            arch=p.arch,
            pretrained=p.pretrained,
            source="preset",
            offline=is_available_offline(p.arch, p.pretrained, cache_dir=cache_dir),
            description=p.description,
        )
        for name, p in PRESETS.items()
    ]
    rows += [
        ModelEntry(
            name=arch,
            arch=arch,
            pretrained="bundled",
            source="bundled",
            offline=is_available_offline(arch, "bundled"),
            description="bundled with clipsearch",
        )
        for arch in bundled
    ]
    rows += [
        ModelEntry(
            name=arch,
            arch=arch,
            pretrained=tag,
            source="open_clip",
            offline=is_available_offline(arch, tag, cache_dir=cache_dir),
        )
        for arch, tag in open_clip.list_pretrained()
    ]
    rows += [
        ModelEntry(name=hub, arch=hub, pretrained=hub, source="hf-cache", offline=True)
        for hub in _cached_hub_models(cache_dir)
    ]
    return rows


def _cached_hub_models(cache_dir: str | None) -> list[str]:
    """``hf-hub:`` ids of cached repos that hold an open_clip config and weights."""
    from huggingface_hub import scan_cache_dir

    from clipsearch.retrieval.encoders.weights import HF_CONFIG_FILE, HF_WEIGHT_FILES, hf_cache_dir

    try:
        info = scan_cache_dir(hf_cache_dir(cache_dir))
    except Exception as e:  # no cache folder yet, or an unreadable one: nothing cached
        log.debug("no usable HuggingFace cache: %s", e)
        return []
    found = []
    for repo in info.repos:
        names = {f.file_name for rev in repo.revisions for f in rev.files}
        if HF_CONFIG_FILE in names and names & set(HF_WEIGHT_FILES):
            found.append(f"hf-hub:{repo.repo_id}")
    return sorted(found)


def describe_model(
    model: str,
    pretrained: str | None = None,
    *,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "auto",
    allow_random: bool = False,
) -> dict[str, Any]:
    """Load a model and report its fingerprint, size and the device/precision chosen."""
    encoder = load_encoder(
        model,
        pretrained,
        device=device,
        precision=precision,
        backend=backend,
        allow_random=allow_random,
    )
    return describe_encoder(encoder, model=model)


def describe_encoder(encoder: Encoder, *, model: str = "") -> dict[str, Any]:
    """JSON-ready facts about a loaded encoder."""
    fp = encoder.fingerprint
    return {
        "model": model or fp.arch,
        "arch": fp.arch,
        "pretrained": fp.pretrained,
        "dim": fp.dim,
        "n_parameters": int(getattr(encoder, "n_parameters", 0)),
        "device": str(getattr(encoder, "device", "cpu")),
        "precision": str(getattr(encoder, "precision", "fp32")),
        "batch_size": int(getattr(encoder, "batch_size", 0)),
        "backend": fp.backend,
        "precision_reason": str(getattr(encoder, "precision_reason", "")),
        "context_length": fp.context_length,
        "fingerprint": fp.to_dict(),
    }


def fetch_model(
    model: str, pretrained: str | None = None, *, cache_dir: str | None = None
) -> dict[str, Any]:
    """Download a model's weights into the local cache (no-op when already cached).

    Returns ``{"model", "arch", "pretrained", "path", "sha256"}``. Raises
    :class:`~clipsearch.retrieval.errors.ModelNotFoundError` when offline and not cached.
    """
    from clipsearch.retrieval.encoders.weights import file_sha256, resolve_weights

    if is_fake(model):
        raise ConfigError("the fake encoder has no weights to fetch")
    arch, weights = resolve_model_name(model, pretrained)
    if not weights and not arch.startswith("hf-hub:"):
        raise ConfigError(
            f"nothing to fetch for {model!r} without --pretrained; pass a tag "
            "(`clipsearch models list` shows the known ones)"
        )
    resolved = resolve_weights(arch, weights, cache_dir=cache_dir, download=True)
    path = resolved.path
    return {
        "model": model,
        "arch": resolved.arch,
        "pretrained": resolved.label,
        "path": str(path) if path else None,
        "sha256": file_sha256(path) if path else None,
    }


@dataclass(frozen=True)
class Embeddings:
    """Result of :func:`embed_inputs`: texts first, then images, in the order given."""

    # Human-readable label per row (the text, or the image path).
    labels: tuple[str, ...]
    # "text" or "image" per row.
    modalities: tuple[str, ...]
    # float32 [n, dim].
    vectors: np.ndarray
    # bool [n]: texts cut to the context length (always False for images).
    truncated: np.ndarray

    def similarity(self) -> np.ndarray:
        """float32 [n, n] inner products (cosine for normalised encoders)."""
        return (self.vectors @ self.vectors.T).astype(np.float32)


def embed_inputs(
    encoder: Encoder, *, texts: Sequence[str] = (), images: Sequence[str | Path] = ()
) -> Embeddings:
    """Embed texts and image files with one encoder (images decoded safely)."""
    from clipsearch.retrieval.encoders.base import load_image_for

    if not texts and not images:
        raise ConfigError("nothing to embed: give at least one --text or --image")
    dim = encoder.dim
    text_enc = encoder.encode_texts_detailed(list(texts)) if texts else None
    pil = [load_image_for(encoder, p) for p in images]
    image_vecs = encoder.encode_images(pil) if pil else np.zeros((0, dim), np.float32)
    text_vecs = text_enc.vectors if text_enc else np.zeros((0, dim), np.float32)
    truncated = np.concatenate(
        [text_enc.truncated if text_enc else np.zeros(0, bool), np.zeros(len(pil), bool)]
    )
    return Embeddings(
        labels=tuple(texts) + tuple(str(p) for p in images),
        modalities=("text",) * len(texts) + ("image",) * len(pil),
        vectors=np.concatenate([text_vecs, image_vecs]).astype(np.float32),
        truncated=truncated,
    )
