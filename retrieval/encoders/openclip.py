"""The open_clip encoder: any open_clip architecture with tag, file, hub or bundled weights.

Device, batch size and precision are chosen per machine and reported on the encoder
(``encoder.device``, ``encoder.precision``, ``encoder.batch_size``); none of them enter
the fingerprint, because they change speed, not which vectors come out (fp16/bf16
vectors agree with fp32 to cosine ~0.9999, see ``benchmarks/encode.py``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.retrieval.encoders.base import (
    QUERY_BATCH,
    QUERY_THREADS,
    BaseEncoder,
    EncoderFingerprint,
    TextEncoding,
    check_prepared,
    truncated_texts,
)
from clipsearch.retrieval.encoders.weights import ResolvedWeights, file_sha256, resolve_weights
from clipsearch.retrieval.errors import ConfigError, ModelNotFoundError
from clipsearch.retrieval.images import to_rgb

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

# "bf16" is autocast (weights stay fp32); "bf16-weights" casts the weights themselves.
PRECISIONS = ("fp32", "fp16", "bf16", "bf16-weights")
# What ``precision="auto"`` resolves to before a measurement decides (bf16-capable CPUs).
MEASURE = "measure"
# Items per forward pass. GPUs want large batches to fill the device; on CPU the
# throughput curve is flat past ~32 while memory and latency keep growing.
DEFAULT_BATCH_SIZE = {"cuda": 256, "cpu": 32, "mps": 64}
# CPU flags that mean native bf16 matrix math (AVX512-BF16, AMX). Without them bf16 is
# emulated and slower than fp32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


class OpenClipEncoder(BaseEncoder):
    """An open_clip model behind the :class:`~clipsearch.retrieval.encoders.base.Encoder` protocol."""

    def __init__(
        self,
        arch: str,
        *,
        pretrained: str = "",
        device: str = "auto",
        precision: str = "auto",
        batch_size: int | None = None,
        normalize: bool = True,
        cache_dir: str | None = None,
        download: bool = True,
        allow_random: bool = False,
        threads: int | None = None,
        query_threads: int | None = QUERY_THREADS,
        purpose: str = "query",
    ) -> None:
        """
        Args:
            arch: open_clip architecture (``ViT-B-32``, a bundled ``clipsearch-demo``) or
                ``hf-hub:org/name``.
            pretrained: tag, checkpoint path, ``hf-hub:`` id, ``bundled``, or ``""`` for a
                seeded random initialisation (tests, benchmarks).
            device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda[:n]``, ``mps``.
            precision: ``auto`` (fp16 on GPU; on CPUs with native bf16 the fastest of
                fp32 / bf16 / bf16-weights by a cached probe, see ``precision.py``; else
                fp32), ``fp32``, ``fp16``, ``bf16`` (autocast; weights stay fp32) or
                ``bf16-weights`` (weights cast to bf16). ``precision_reason`` says why.
            batch_size: items per forward pass; None picks a default per device.
            normalize: L2-normalise outputs (then cosine == inner product).
            cache_dir: weights cache; None uses the HuggingFace / open_clip defaults.
            download: fetch missing weights when online; False raises instead.
            allow_random: permit ``pretrained=""`` (random weights, random vectors); without
                it a missing ``pretrained`` is a ConfigError, so no index is silently built
                from noise.
            threads: torch intra-op threads for calls of more than ``QUERY_BATCH`` items
                (indexing). None or 0: the count torch had on the thread that loaded the
                encoder (torch's default, every physical core, unless ``OMP_NUM_THREADS``
                or ``torch.set_num_threads`` said otherwise), fixed at load time.
            query_threads: torch intra-op threads for calls of up to ``QUERY_BATCH`` items
                (queries). 1 by default: on a loaded 2-core CPU, one-text queries on torch's
                default threads had p50/p90 latency 10x/12x that of one thread
                (``benchmarks/query_threads.py``).
                None: the same as ``threads``. Only CPU devices are affected; see
                :meth:`threads_for` for what is set and what it guarantees.
            purpose: ``query`` or ``build``, what the encoder will mostly run. Only
                ``precision="auto"`` on a bf16 CPU uses it: the probe's one-item ratios
                decide for queries, its batch ratios for builds.
        """
        import open_clip
        import torch

        from clipsearch.retrieval.models import register

        register()
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.precision_reason = _reason(precision, self.precision, self.device)
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE.get(self.device.split(":")[0], 32)
        self.normalize = normalize
        if threads is not None and threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 or None: torch's default), got {threads}")
        if query_threads is not None and query_threads < 1:
            raise ConfigError(
                f"query_threads must be >= 1, or None for the same as threads; got {query_threads}"
            )
        if purpose not in ("query", "build"):
            raise ConfigError(f"unknown purpose {purpose!r}; expected query or build")
        self.threads = threads or torch.get_num_threads()
        self.query_threads = query_threads
        self.weights = resolve_weights(arch, pretrained, cache_dir=cache_dir, download=download)
        if self.weights.path is None and not allow_random:
            raise ConfigError(
                f"model {arch!r} has no weights: without --pretrained its vectors are random. "
                "Pass --pretrained TAG (`clipsearch models list` shows the tags), a preset "
                "such as vit-b-32, or --random-weights (allow_random=True) if random vectors "
                "are what you want"
            )
        self.model = _create_model(self.weights)
        self._torch_device = torch.device(self.device)
        self.model.to(self._torch_device).eval()
        cfg = self.model.visual.preprocess_cfg
        self._preprocess = open_clip.image_transform(
            cfg["size"],
            is_train=False,
            mean=cfg["mean"],
            std=cfg["std"],
            interpolation=cfg["interpolation"],
            resize_mode=cfg["resize_mode"],
            fill_color=cfg.get("fill_color", 0),
        )
        self.tokenizer = _load_tokenizer(self.weights.model_name)
        self.context_length = int(self.tokenizer.context_length)
        self.n_parameters = sum(p.numel() for p in self.model.parameters())
        self._fingerprint = self._make_fingerprint(cfg)
        if self.precision == MEASURE:
            from clipsearch.retrieval.encoders.precision import choose_cpu_precision

            self.precision = "fp32"  # the probe runs the fp32 model
            self.precision, self.precision_reason, _ = choose_cpu_precision(self, purpose)
        if self.precision == "bf16-weights":
            self.model.to(torch.bfloat16)
        log.info("loaded %r (%s parameters)", self, f"{self.n_parameters:,}")

    def __repr__(self) -> str:
        fp = self._fingerprint
        return (
            f"OpenClipEncoder({fp.arch!r}, pretrained={fp.pretrained!r}, dim={fp.dim}, "
            f"device={self.device!r}, precision={self.precision!r})"
        )

    def _make_fingerprint(self, cfg: dict[str, Any]) -> EncoderFingerprint:
        size = cfg["size"]
        if isinstance(size, (tuple, list)):
            if len(set(size)) != 1:
                raise ConfigError(
                    f"{self.weights.arch}: non-square input size {tuple(size)} is not supported"
                )
            size = size[0]
        path = self.weights.path
        return EncoderFingerprint(
            kind="open_clip",
            arch=self.weights.arch,
            pretrained=self.weights.label,
            weights_sha256=file_sha256(path) if path is not None else None,
            dim=_embed_dim(self.model),
            normalize=self.normalize,
            image_size=int(size),
            image_mean=tuple(float(x) for x in cfg["mean"]),
            image_std=tuple(float(x) for x in cfg["std"]),
            interpolation=str(cfg["interpolation"]),
            resize_mode=str(cfg["resize_mode"]),
            tokenizer=_tokenizer_id(self.tokenizer),
            context_length=self.context_length,
        )

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> float32 ``[3, S, S]``: to_rgb, then the model's own transform."""
        tensor = self._preprocess(to_rgb(image))
        return np.ascontiguousarray(tensor.numpy(), dtype=np.float32)

    def encode_prepared(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``[n, 3, S, S]`` -> float32 ``[n, dim]`` in chunks of ``batch_size``."""
        import torch

        batch = check_prepared(batch, self._fingerprint.image_size)
        out = [np.zeros((0, self.dim), np.float32)]
        dtype = torch.bfloat16 if self.precision == "bf16-weights" else torch.float32
        with self._threads(len(batch)):
            for start in range(0, len(batch), self.batch_size):
                x = torch.from_numpy(batch[start : start + self.batch_size])
                x = x.to(self._torch_device, dtype=dtype)
                with self._inference():
                    out.append(self._finish(self.model.encode_image(x)))
        return np.concatenate(out)

    def encode_texts_detailed(self, texts: Sequence[str]) -> TextEncoding:
        """Texts -> vectors, which texts were cut to the context, and their token counts."""
        if isinstance(texts, str):
            raise TypeError("encode_texts_detailed takes a sequence of strings, not one string")
        texts = list(texts)
        n_tokens = np.array([self.count_tokens(t) for t in texts], dtype=np.int64)
        truncated = truncated_texts(n_tokens, self.context_length, self._fingerprint.arch)
        out = [np.zeros((0, self.dim), np.float32)]
        with self._threads(len(texts)):
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(texts[start : start + self.batch_size])
                with self._inference():
                    out.append(self._finish(self.model.encode_text(tokens.to(self._torch_device))))
        return TextEncoding(vectors=np.concatenate(out), truncated=truncated, n_tokens=n_tokens)

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` needs, start/end tokens included, before any truncation."""
        tok = self.tokenizer
        name = type(tok).__name__
        if name == "SimpleTokenizer":
            return len(tok.encode(text)) + 2
        inner = getattr(tok, "tokenizer", None)
        if inner is not None and callable(inner):
            clean = getattr(tok, "clean_fn", lambda s: s)
            return len(inner(clean(text), add_special_tokens=True)["input_ids"])
        # Unknown tokenizer: count non-padding ids of the (possibly cut) output.
        return int((tok([text])[0] != 0).sum())

    def threads_for(self, n_items: int) -> int | None:
        """Intra-op threads a call with ``n_items`` items runs on; None: left as it is.

        Calls of up to ``QUERY_BATCH`` items take ``query_threads``, larger ones
        ``threads``; None on GPU/MPS devices, where the forward pass does not run on
        CPU threads. See ``_threads`` for how the count is applied and what is guaranteed
        when several threads encode at once.
        """
        if self._torch_device.type != "cpu":
            return None
        if n_items <= QUERY_BATCH and self.query_threads is not None:
            return self.query_threads
        return self.threads

    @contextlib.contextmanager
    def _threads(self, n_items: int) -> Iterator[None]:
        """Run the block on ``threads_for(n_items)`` threads, then restore the caller's.

        torch (OpenMP backend) keeps the thread count per calling OS thread: a Python
        thread's first torch op copies a process-wide value, and ``torch.set_num_threads``
        changes the calling thread's count and that process-wide value. So the count is
        set around every call (~0.2 us per switch, no slower forward pass after one:
        measured in ``benchmarks/query_threads.py``), on whichever thread calls, and
        concurrent calls from several threads each run on their own count. Not
        guaranteed: a thread that runs its *first* torch op while a call is switched
        starts from the switched count (it is this encoder's own calls that are pinned,
        not other torch code in the process).
        """
        want = self.threads_for(n_items)
        if want is None:
            yield
            return
        import torch

        have = torch.get_num_threads()
        if have == want:
            yield
            return
        torch.set_num_threads(want)
        try:
            yield
        finally:
            torch.set_num_threads(have)

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        import torch

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        with torch.inference_mode():
            if dtype is None:
                yield
            else:
                with torch.autocast(device_type=self._torch_device.type, dtype=dtype):
                    yield

    def _finish(self, features: torch.Tensor) -> np.ndarray:
        import torch.nn.functional as F

        features = features.float()
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)


def _create_model(weights: ResolvedWeights) -> Any:
    """Build the open_clip model on CPU in fp32 and load the weights file into it."""
    import open_clip
    import torch

    # Seeded so that random-init encoders (pretrained="") with equal fingerprints agree.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            return open_clip.create_model(
                weights.model_name,
                pretrained=str(weights.path) if weights.path else None,
                force_quick_gelu=weights.quick_gelu,
                force_preprocess_cfg=weights.preprocess or None,
                device="cpu",
                weights_only=True,
            )
        except Exception as e:  # open_clip raises RuntimeError/KeyError/pickle errors
            raise ConfigError(_load_failure(weights, e)) from e


def _load_tokenizer(model_name: str) -> Any:
    """open_clip's tokenizer for the model; HF tokenizers must be cached when offline."""
    import open_clip

    try:
        return open_clip.get_tokenizer(model_name)
    except Exception as e:  # HF tokenizers raise OSError/HTTP errors when not cached
        raise ModelNotFoundError(
            f"cannot load the tokenizer of {model_name!r}: {type(e).__name__}: {e}; "
            "its HuggingFace tokenizer files must be in the local cache: load the model "
            "once while online"
        ) from e


def _load_failure(weights: ResolvedWeights, e: Exception) -> str:
    where = f"weights {weights.path}" if weights.path else "a random initialisation"
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else type(e).__name__
    if "Weights only load failed" in str(e) or "weights_only" in str(e):
        fix = "it is not a plain state dict; re-save it with safetensors or torch.save(model.state_dict())"
    elif "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
        fix = f"the checkpoint was trained for a different architecture than {weights.arch!r}"
    else:
        fix = "check that the file is a complete open_clip checkpoint for this architecture"
    return f"cannot load model {weights.arch!r} from {where}: {type(e).__name__}: {first}; {fix}"


def _embed_dim(model: Any) -> int:
    dim = getattr(model.visual, "output_dim", None)
    if dim is None:
        proj = getattr(model, "text_projection", None)
        dim = proj.shape[-1] if proj is not None else None
    if dim is None:
        raise ConfigError(f"cannot determine the embedding dimension of {type(model).__name__}")
    return int(dim)


def _tokenizer_id(tok: Any) -> str:
    name = type(tok).__name__
    if name == "SimpleTokenizer":
        return "clip-bpe"
    inner = getattr(tok, "tokenizer", None)
    source = getattr(inner, "name_or_path", "") or ""
    if source:
        from clipsearch.retrieval.models import portable_path

        # A tokenizer shipped inside the package: record "bundled:<folder>", not the
        # install path, so an index stays valid when the package moves.
        source = portable_path(source)
    return f"{name}:{source}" if source else name


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; checks explicit requests."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} requested but CUDA is not available; use --device cpu"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} requested but MPS is not available; use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> fp16 on CUDA, ``"measure"`` on CPUs with native bf16, fp32 otherwise.

    ``"measure"`` means: time fp32 against bf16 autocast and bf16 weights once the model
    is loaded (``precision.choose_cpu_precision``); native bf16 alone does not make bf16
    faster (autocast measured 0.6-0.9x fp32 for ViT-B-32 on an AVX512-BF16 CPU).
    """
    if precision == "auto":
        kind = device.split(":")[0]
        if kind == "cuda":
            return "fp16"
        if kind == "cpu" and cpu_supports_bf16():
            return MEASURE
        return "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; expected auto, {', '.join(PRECISIONS)}"
        )
    return precision


def _reason(requested: str, resolved: str, device: str) -> str:
    if requested != "auto":
        return "requested"
    if resolved == "fp16":
        return "auto: fp16 on CUDA"
    if resolved == MEASURE:
        return "auto: to be measured"
    return "auto: fp32 (no native bf16 on this CPU)" if device == "cpu" else "auto"


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    if platform.system() != "Linux":
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return any(f in flags for f in BF16_CPU_FLAGS)
    return False
