"""Encoders: the protocol, the open_clip implementation, and a fake for tests.

``load_encoder`` is the one entry point the indexer, the engine and the CLI use. It maps
a model name (a preset, an open_clip architecture, or ``fake``/``fake-<dim>``) plus an
optional pretrained tag / checkpoint path / ``hf-hub:`` id onto an :class:`Encoder`.
open_clip and torch are imported only when an open_clip model is actually loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clipsearch.retrieval.encoders.base import (
    QUERY_BATCH,
    QUERY_THREADS,
    BaseEncoder,
    Encoder,
    EncoderFingerprint,
    TextEncoding,
    decode_side,
    l2_normalize,
    load_image_for,
)
from clipsearch.retrieval.encoders.fake import FakeEncoder
from clipsearch.retrieval.errors import ConfigError, FingerprintMismatchError, ModelNotFoundError

if TYPE_CHECKING:
    from clipsearch.retrieval.encoders.openclip import OpenClipEncoder

__all__ = [
    "BACKENDS",
    "PRESETS",
    "QUERY_BATCH",
    "QUERY_THREADS",
    "BaseEncoder",
    "Encoder",
    "EncoderFingerprint",
    "FakeEncoder",
    "OpenClipEncoder",
    "Preset",
    "TextEncoding",
    "decode_side",
    "encoder_from_fingerprint",
    "is_fake",
    "l2_normalize",
    "load_encoder",
    "load_image_for",
    "resolve_model_name",
]

DEFAULT_MODEL = "clipsearch-demo"


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A named (architecture, weights) pair users can pass as ``--model``."""

    # open_clip architecture name.
    arch: str
    # Pretrained tag, or "bundled" for weights shipped inside this package.
    pretrained: str
    # One line for `clipsearch models list`.
    description: str


PRESETS: dict[str, Preset] = {
    "clipsearch-demo": Preset(
        arch="clipsearch-demo",
        pretrained="bundled",
        description="small CLIP trained on the generated demo shop catalog; offline, CPU-fast",
    ),
    "vit-b-32": Preset(
        arch="ViT-B-32",
        pretrained="laion2b_s34b_b79k",
        description="OpenCLIP ViT-B/32 trained on LAION-2B; the common general-purpose choice",
    ),
    "vit-b-16": Preset(
        arch="ViT-B-16",
        pretrained="laion2b_s34b_b88k",
        description="OpenCLIP ViT-B/16 on LAION-2B; better quality, ~4x slower than B/32",
    ),
    "vit-l-14": Preset(
        arch="ViT-L-14",
        pretrained="laion2b_s32b_b82k",
        description="OpenCLIP ViT-L/14 on LAION-2B; high quality, GPU recommended",
    ),
}

_FAKE = re.compile(r"^fake(?:-(\d+))?$")


BACKENDS = ("auto", "torch", "onnx")
# What an encoder is loaded for: short queries, or embedding a corpus (index build/add).
PURPOSES = ("query", "build")


def load_encoder(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    backend: str = "auto",
    allow_random: bool = False,
    threads: int | None = None,
    query_threads: int | None = QUERY_THREADS,
    purpose: str = "query",
) -> Encoder:
    """Load an encoder by name.

    Args:
        model: a preset name (``clipsearch-demo``, ``vit-b-32``...), any open_clip
            architecture (``ViT-B-32``), an ONNX export folder, or ``fake`` /
            ``fake-<dim>`` for the test encoder.
        pretrained: pretrained tag, local checkpoint path (``.safetensors``, ``.pt``,
            ``.bin``) or ``hf-hub:org/name``; defaults to the preset's weights. For fakes,
            an integer seed.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``.
        precision: ``auto`` (measured per machine and model, see ``precision.py``),
            ``fp32``, ``fp16``, ``bf16``, ``bf16-weights``. Torch only.
        batch_size: items per forward pass; None picks a default per device.
        backend: ``onnx`` (an export: the folder given as ``model``, or the cached
            export of the model, see ``clipsearch models export``), ``torch``, or
            ``auto``: ONNX when an export exists (the bundled demo model ships one) and
            onnxruntime is installed, else torch.
        allow_random: an open_clip architecture without weights is refused (its vectors
            are random) unless this is True.
        threads: intra-op threads for calls of more than ``QUERY_BATCH`` (4) items, the
            indexing batches. None or 0: the backend's default (onnxruntime: every
            physical core; torch: the count torch had when the model was loaded).
        query_threads: intra-op threads for calls of up to ``QUERY_BATCH`` items (queries),
            both backends. 1 by default: a one-query forward pass gains little from more
            threads, and on a loaded CPU torch's default threads made a one-text query's
            p50/p90 latency 10x/12x worse (``benchmarks/query_threads.py``). None: the same
            as ``threads``.
        purpose: ``query`` or ``build``. With ``backend="auto"`` and an export, queries
            always take ONNX (no torch import: ~7x faster process start); builds take
            whichever backend a cached timing probe measured faster for this model on this
            machine (ONNX ran the demo model 6.9x faster than torch, a ViT-B-32 0.67x:
            ``benchmarks/ingest.py``). On a bf16-capable CPU ``precision="auto"`` follows
            the purpose too: the probe's one-item ratios decide queries, its batch
            ratios builds (see ``precision.py``).
    """
    if purpose not in PURPOSES:
        raise ConfigError(f"unknown purpose {purpose!r}; expected one of {', '.join(PURPOSES)}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    m = _FAKE.match(model)
    if m:
        try:
            seed = int(pretrained) if pretrained not in (None, "") else 0
        except ValueError as e:
            raise ConfigError(
                f"the fake encoder takes an integer seed as pretrained, got {pretrained!r}"
            ) from e
        return FakeEncoder(int(m.group(1) or 64), seed=seed, batch_size=batch_size or 64)
    from clipsearch.retrieval.encoders import onnx

    if backend != "torch" and onnx.is_export_dir(model):
        if pretrained:
            raise ConfigError(f"{model} is an ONNX export with its own weights; drop --pretrained")
        return onnx.OnnxEncoder(
            model, device=device, batch_size=batch_size, threads=threads,
            query_threads=query_threads,
        )  # fmt: skip
    arch, weights = resolve_model_name(model, pretrained)
    if backend != "torch":
        found = onnx.find_export_by_name(arch, weights)
        if found is not None and (backend == "onnx" or onnx.onnxruntime_available()):
            onnx_encoder = onnx.OnnxEncoder(
                found, device=device, batch_size=batch_size, threads=threads,
                query_threads=query_threads,
            )  # fmt: skip
            if backend == "onnx" or purpose == "query":
                return onnx_encoder
            from clipsearch.retrieval.encoders.openclip import OpenClipEncoder
            from clipsearch.retrieval.encoders.precision import choose_build_backend

            torch_encoder = OpenClipEncoder(
                arch, pretrained=weights, device=device, precision=precision,
                batch_size=batch_size, allow_random=allow_random, threads=threads,
                query_threads=query_threads, purpose=purpose,
            )  # fmt: skip
            faster = choose_build_backend(torch_encoder, onnx_encoder)
            return onnx_encoder if faster == "onnx" else torch_encoder
        if backend == "onnx":
            raise ModelNotFoundError(
                f"no ONNX export of {model!r}{f' / {pretrained!r}' if pretrained else ''} in "
                f"{onnx.onnx_cache_root()}; create it with `clipsearch models export {model}"
                f"{f' --pretrained {pretrained}' if pretrained else ''} --format onnx`, or pass "
                "an export folder as the model"
            )
    from clipsearch.retrieval.encoders.openclip import OpenClipEncoder

    return OpenClipEncoder(
        arch,
        pretrained=weights,
        device=device,
        precision=precision,
        batch_size=batch_size,
        allow_random=allow_random,
        threads=threads,
        query_threads=query_threads,
        purpose=purpose,
    )


def is_fake(model: str) -> bool:
    """True for ``fake`` / ``fake-<dim>``, the torch-free test encoder."""
    return _FAKE.match(model) is not None


def resolve_model_name(model: str, pretrained: str | None = None) -> tuple[str, str]:
    """Map a preset or architecture plus optional weights onto ``(arch, pretrained)``.

    A preset supplies its own weights unless ``pretrained`` overrides them; a bare
    architecture without ``pretrained`` means random initialisation (``""``).
    """
    preset = PRESETS.get(model)
    if preset is None:
        return model, pretrained or ""
    return preset.arch, preset.pretrained if pretrained is None else pretrained


def encoder_from_fingerprint(
    fp: EncoderFingerprint,
    *,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "auto",
    threads: int | None = None,
    query_threads: int | None = QUERY_THREADS,
    purpose: str = "query",
) -> Encoder:
    """Re-create the encoder an index was built with, from its manifest fingerprint.

    ``backend="auto"`` answers from an ONNX export of the same model when there is one
    (its fingerprint was checked against torch when exported; ``backend`` is recorded,
    not compared), else loads torch; with ``purpose="build"`` (``index add``) it takes
    the backend measured faster, as :func:`load_encoder` does. ``threads`` (indexing
    batches) and ``query_threads`` (calls of up to ``QUERY_BATCH`` items, 1 by default)
    set either backend's intra-op threads, as in :func:`load_encoder`.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if fp.kind == "fake":
        seed_part = fp.pretrained.split(";")[0]
        seed = int(seed_part.removeprefix("seed="))
        enc = FakeEncoder(fp.dim, seed=seed, context_length=fp.context_length)
        if enc.fingerprint.diff(fp):
            raise ConfigError(f"cannot re-create fake encoder from fingerprint {fp.to_dict()}")
        return enc
    if fp.kind == "open_clip":
        if backend != "torch":
            from clipsearch.retrieval.encoders import onnx

            found = onnx.find_export(fp)
            wanted = backend == "onnx" or (purpose == "query" and onnx.onnxruntime_available())
            if found is not None and wanted:
                return onnx.OnnxEncoder(
                    found, device=device, threads=threads, query_threads=query_threads
                )
            if backend == "onnx":
                raise ModelNotFoundError(
                    f"no ONNX export of {fp.arch!r} / {fp.pretrained!r} (weights sha256 "
                    f"{(fp.weights_sha256 or '?')[:16]}) in {onnx.onnx_cache_root()}; create it "
                    f"with `clipsearch models export {fp.arch} --pretrained {fp.pretrained} "
                    "--format onnx`, or use --backend torch"
                )
        loaded = load_encoder(
            fp.arch,
            fp.pretrained,
            device=device,
            precision=precision,
            backend="torch" if backend == "torch" else "auto",
            allow_random=fp.pretrained == "",  # the index was built from random weights
            threads=threads,
            query_threads=query_threads,
            purpose=purpose,
        )
        changed = fp.diff(loaded.fingerprint)
        if changed:
            detail = "; ".join(f"{k}: index has {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise FingerprintMismatchError(
                f"the encoder {fp.arch!r} / {fp.pretrained!r} no longer matches the one the index "
                f"was built with ({detail}); restore the original weights or rebuild the index"
            )
        return loaded
    raise ConfigError(f"unknown encoder kind {fp.kind!r} in fingerprint")


def __getattr__(name: str) -> object:
    # OpenClipEncoder imports torch and open_clip; load it only when asked for.
    if name == "OpenClipEncoder":
        from clipsearch.retrieval.encoders.openclip import OpenClipEncoder

        return OpenClipEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
