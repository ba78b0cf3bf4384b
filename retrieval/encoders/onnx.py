"""The ONNX Runtime encoder: an exported open_clip model without torch or open_clip.

An export (``clipsearch models export MODEL --format onnx``, see ``onnx_export``) is a
folder::

    clipsearch-onnx.json            # manifest: fingerprint, tokenizer, preprocessing, check
    image.onnx                      # pixels float32 [n, 3, S, S] -> embeddings float32 [n, dim]
    text.onnx                       # tokens int64 [n, context] -> embeddings float32 [n, dim]
    bpe_simple_vocab_16e6.txt.gz    # the tokenizer's merges, copied from open_clip

Tokenizing (``bpe.ClipTokenizer``) and preprocessing (``preprocess.ImagePreprocess``)
are plain Python, Pillow and numpy. The encoder's fingerprint is the torch model's
(checked at export: every sample vector at cosine >= 0.999), with ``backend="onnx"``.

Sessions are created on first use, so a text-only query process never loads the image
graph.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import replace
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
    l2_normalize,
    truncated_texts,
)
from clipsearch.retrieval.encoders.bpe import ClipTokenizer
from clipsearch.retrieval.encoders.hf_tokenizer import HfTokenizer
from clipsearch.retrieval.encoders.onnx_cache import (
    OptimizedGraphs,
    cached_sha256,
    graph_cache_enabled,
    onnx_cache_root,
)
from clipsearch.retrieval.encoders.preprocess import ImagePreprocess
from clipsearch.retrieval.errors import ConfigError, ModelNotFoundError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

MANIFEST_NAME = "clipsearch-onnx.json"
EXPORT_FORMAT = "clipsearch-onnx"
EXPORT_VERSION = 1
# Items per ONNX run. Like torch on CPU, throughput is flat past ~32 images.
DEFAULT_BATCH_SIZE = 32
# A bundled model's export ships beside its weights as ``<arch>-onnx/``.
SHIPPED_SUFFIX = "-onnx"
TOWERS = ("image", "text")
# The text every cached optimised text graph is checked with (see onnx_cache).
PROBE_TEXT = "a probe: red striped cotton t-shirt"  # ASCII: cleaning it needs no ftfy


def cache_dir_for(fp: EncoderFingerprint) -> Path | None:
    """The cache folder of the export of the model ``fp`` describes; None when unnamed.

    Only models whose weights have a sha256 (a file) get a cache folder: a random
    initialisation or a multi-file hub model has no stable identity to key it by.
    """
    if not fp.weights_sha256:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in fp.arch)
    return onnx_cache_root() / f"{safe}-{fp.weights_sha256[:16]}"


def find_export(fp: EncoderFingerprint) -> Path | None:
    """A cached export whose recorded fingerprint matches ``fp``, or None."""
    if fp.pretrained == "bundled":
        shipped = shipped_export(fp.arch)
        if shipped is not None and not _stored_fingerprint(shipped).diff(fp):
            return shipped
    folder = cache_dir_for(fp)
    if folder is None or not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        stored = _stored_fingerprint(folder)
    except (ConfigError, ModelNotFoundError, KeyError) as e:
        log.warning("ignoring the ONNX export in %s: %s", folder, e)
        return None
    return folder if not stored.diff(fp) else None


def _stored_fingerprint(folder: Path) -> EncoderFingerprint:
    return EncoderFingerprint.from_dict(read_manifest(folder)["fingerprint"])


def find_export_by_name(arch: str, pretrained: str) -> Path | None:
    """The export of ``arch`` with weights ``pretrained`` (as ``resolve_model_name`` gives).

    Bundled models look in the package first (``clipsearch/retrieval/models/<arch>-onnx``);
    then the cache is scanned for an export whose manifest names the same architecture
    and weights. A cached export of a weights *file* is used only while the file's
    sha256 still matches. No torch, no open_clip.
    """
    if pretrained == "bundled":
        shipped = shipped_export(arch)
        if shipped is not None:
            return shipped
    root = onnx_cache_root()
    if not pretrained or not root.is_dir():
        return None
    label = pretrained
    weights_file = Path(pretrained).expanduser()
    if weights_file.is_file():
        label = str(weights_file.resolve())
    for manifest_path in sorted(root.glob(f"*/{MANIFEST_NAME}")):
        try:
            fp = EncoderFingerprint.from_dict(read_manifest(manifest_path.parent)["fingerprint"])
        except (ConfigError, ModelNotFoundError, KeyError) as e:
            log.warning("ignoring the ONNX export in %s: %s", manifest_path.parent, e)
            continue
        if fp.arch != arch or fp.pretrained != label:
            continue
        if weights_file.is_file():
            from clipsearch.retrieval.encoders.weights import file_sha256

            if file_sha256(weights_file) != fp.weights_sha256:
                log.info("ONNX export %s is of an older %s; not used", manifest_path.parent, label)
                continue
        return manifest_path.parent
    return None


def shipped_export(arch: str) -> Path | None:
    """The export shipped beside bundled weights, if it was made from those very weights.

    A shipped export reads its largest tensors from the bundled safetensors file, so
    one made from other weights (the demo model retrained, the export not refreshed)
    would give wrong vectors: its recorded sha256 must match the file (hashed once,
    then remembered across processes: see ``cached_sha256``).
    """
    from clipsearch.retrieval.models import MODELS_DIR, bundled_weights

    folder, weights = MODELS_DIR / f"{arch}{SHIPPED_SUFFIX}", bundled_weights(arch)
    if not (folder / MANIFEST_NAME).is_file():
        return None
    if weights is None:
        return None
    try:
        stored = _stored_fingerprint(folder)
    except (ConfigError, ModelNotFoundError, KeyError) as e:
        log.warning("ignoring the shipped ONNX export %s: %s", folder, e)
        return None
    if stored.weights_sha256 != cached_sha256(weights):
        log.warning(
            "the shipped ONNX export %s was made from other weights than %s; not used. "
            "Re-export it: clipsearch models export %s --format onnx --out %s --overwrite",
            folder,
            weights,
            arch,
            folder,
        )
        return None
    return folder


def onnxruntime_available() -> bool:
    """True when onnxruntime can be imported (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def is_export_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder holding an ONNX export manifest."""
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    """The export manifest of ``folder``, checked for format and version."""
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ModelNotFoundError(
            f"{folder} is not an ONNX export (no {MANIFEST_NAME}); create one with "
            "`clipsearch models export MODEL --format onnx --out DIR`"
        ) from e
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}; re-export the model") from e
    if manifest.get("format") != EXPORT_FORMAT or manifest.get("version") != EXPORT_VERSION:
        raise ConfigError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r} "
            f"is not {EXPORT_FORMAT!r} v{EXPORT_VERSION}; re-export with this clipsearch"
        )
    return manifest


def import_onnxruntime() -> Any:
    """onnxruntime, or a clear error saying how to get it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ConfigError(
            "the ONNX backend needs onnxruntime, which is not installed: "
            "pip install 'clipsearch[onnx]', or use --backend torch"
        ) from e
    return onnxruntime


class OnnxEncoder(BaseEncoder):
    """An exported open_clip model on ONNX Runtime (CPU, or CUDA when its provider exists)."""

    def __init__(
        self,
        export_dir: str | os.PathLike[str],
        *,
        device: str = "auto",
        batch_size: int | None = None,
        threads: int | None = None,
        query_threads: int | None = QUERY_THREADS,
        cache_graphs: bool = True,
    ) -> None:
        """
        Args:
            export_dir: a folder written by ``export_onnx``.
            device: ``auto`` (CUDA when onnxruntime has its provider, else CPU), ``cpu``,
                ``cuda`` or ``cuda:N``.
            batch_size: items per ONNX run; None picks 32.
            threads: intra-op threads for batches (indexing); None lets onnxruntime use
                every physical core.
            query_threads: intra-op threads for small batches (up to
                ``QUERY_BATCH`` items: queries). 1 by default: a one-query forward pass
                gains little from more threads, and spinning threads on a loaded CPU
                made p90 query latency 40x worse than one thread. None: same as
                ``threads``. Small batches then run on a second session of the same
                graph, created on first use.
            cache_graphs: CPU sessions load the tower's optimised graph saved by an
                earlier process (made and saved on first use; see ``onnx_cache``):
                ~125 ms less per cold process for the demo text tower. False (or
                ``CLIPSEARCH_ONNX_GRAPH_CACHE=0``) always builds from the export.
        """
        ort = import_onnxruntime()
        self.export_dir = Path(export_dir)
        manifest = read_manifest(self.export_dir)
        self.manifest = manifest
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if threads is not None and threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 = onnxruntime's default), got {threads}")
        if query_threads is not None and query_threads < 1:
            raise ConfigError(f"query_threads must be >= 1 or None, got {query_threads}")
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.threads = threads
        self.query_threads = query_threads
        self.device, self._providers = _providers(ort, device)
        self.precision = "int8" if manifest.get("quantized") else "fp32"
        stored = EncoderFingerprint.from_dict(manifest["fingerprint"])
        self._fingerprint = replace(stored, backend="onnx")
        self.normalize = stored.normalize
        self.logit_scale = float(manifest.get("logit_scale") or 0.0) or None
        self.tokenizer = _tokenizer(self.export_dir, manifest["tokenizer"])
        self.context_length = self.tokenizer.context_length
        pre = manifest["preprocess"]
        self._preprocess = ImagePreprocess(
            size=int(pre["size"]),
            mean=tuple(float(x) for x in pre["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in pre["std"]),  # type: ignore[arg-type]
            interpolation=str(pre["interpolation"]),
            resize_mode=str(pre["resize_mode"]),
        )
        self.cache_graphs = cache_graphs
        self._graphs: OptimizedGraphs | None = None
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        log.info("loaded %r", self)

    def __repr__(self) -> str:
        fp = self._fingerprint
        return (
            f"OnnxEncoder({fp.arch!r}, pretrained={fp.pretrained!r}, dim={fp.dim}, "
            f"dir={str(self.export_dir)!r}, device={self.device!r}, precision={self.precision!r})"
        )

    def _session(self, tower: str, n_items: int) -> Any:
        small = self.query_threads is not None and n_items <= QUERY_BATCH
        threads = self.query_threads if small else self.threads
        key = f"{tower}/{threads}"
        sess = self._sessions.get(key)
        if sess is not None:
            return sess
        with self._lock:
            sess = self._sessions.get(key)
            if sess is None:
                sess = self._sessions[key] = self._open(tower, threads)
        return sess

    def _open(self, tower: str, threads: int | None) -> Any:
        ort = import_onnxruntime()
        path = self.export_dir / self.manifest[f"{tower}_model"]
        opts = ort.SessionOptions()
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # errors only; warnings go through our own log
        graphs = self._graph_cache()
        if graphs is None:
            return self._create(tower, path, opts)
        return graphs.open(tower, opts, lambda o: self._create(tower, path, o))

    def _graph_cache(self) -> OptimizedGraphs | None:
        """The optimised-graph cache of this export (CPU sessions only; see onnx_cache)."""
        if not self.cache_graphs or self.device != "cpu" or not graph_cache_enabled():
            return None
        if self._graphs is None:
            from clipsearch.retrieval.models import MODELS_DIR

            linked = (self.manifest.get("linked") or {}).get("bundled")
            size = int(self.manifest["preprocess"]["size"])
            image_probe = np.sin(np.arange(3 * size * size, dtype=np.float32) * 0.37)
            self._graphs = OptimizedGraphs(
                arch=self._fingerprint.arch,
                graphs={t: self.export_dir / self.manifest[f"{t}_model"] for t in TOWERS},
                linked=MODELS_DIR / linked if linked else None,
                probes={
                    "text": self.tokenizer.tokenize([PROBE_TEXT])[0],
                    "image": image_probe.reshape(1, 3, size, size),
                },
            )
        return self._graphs

    def _create(self, tower: str, path: Path, opts: Any) -> Any:
        """A session of ``tower`` made from the export (linked weights supplied)."""
        ort = import_onnxruntime()
        linked = self.manifest.get("linked") or {}
        tensors = (linked.get("towers") or {}).get(tower) or {}
        if tensors:
            from clipsearch.retrieval.models import MODELS_DIR

            source = MODELS_DIR / linked["bundled"]
            weights = read_safetensors(source, keys=set(tensors.values()))
            names = list(tensors)
            values = [ort.OrtValue.ortvalue_from_numpy(weights[tensors[n]]) for n in names]
            opts.add_external_initializers(names, values)
        try:
            return ort.InferenceSession(str(path), sess_options=opts, providers=self._providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
            raise ConfigError(
                f"cannot load the ONNX {tower} model {path}: {type(e).__name__}: {e}; "
                "re-export the model (clipsearch models export MODEL --format onnx)"
            ) from e

    def _run(self, tower: str, x: np.ndarray) -> np.ndarray:
        sess = self._session(tower, len(x))
        name = sess.get_inputs()[0].name
        out = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(x), self.batch_size):
            (y,) = sess.run(None, {name: x[start : start + self.batch_size]})
            y = np.asarray(y, dtype=np.float32)
            out.append(l2_normalize(y) if self.normalize else y)
        return np.concatenate(out)

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> float32 ``[3, S, S]`` exactly as open_clip's eval transform."""
        return self._preprocess(image)

    def encode_prepared(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``[n, 3, S, S]`` -> float32 ``[n, dim]``."""
        batch = check_prepared(batch, self._fingerprint.image_size)
        return self._run("image", batch)

    def encode_texts_detailed(self, texts: Sequence[str]) -> TextEncoding:
        """Texts -> vectors, which texts were cut to the context, and their token counts."""
        if isinstance(texts, str):
            raise TypeError("encode_texts_detailed takes a sequence of strings, not one string")
        tokens, n_tokens = self.tokenizer.tokenize(list(texts))
        truncated = truncated_texts(n_tokens, self.context_length, self._fingerprint.arch)
        return TextEncoding(
            vectors=self._run("text", tokens), truncated=truncated, n_tokens=n_tokens
        )

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` needs, start/end tokens included, before any truncation."""
        return self.tokenizer.count_tokens(text)


SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": None, "I64": np.int64}


def read_safetensors(
    path: str | os.PathLike[str], *, keys: set[str] | None = None
) -> dict[str, np.ndarray]:
    """Float tensors of a safetensors file as float32 numpy arrays (no torch).

    ``keys``: only these tensors (all float ones when None). The format is an 8-byte
    little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
    and the raw tensor bytes; the file is memory-mapped and each tensor copied once.
    """
    import struct

    p = Path(path)
    try:
        with p.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ModelNotFoundError(
            f"cannot read weights {p}: {e}; reinstall clipsearch or re-export the model"
        ) from e
    data = np.memmap(p, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for key, meta in header.items():
        if key == "__metadata__" or (keys is not None and key not in keys):
            continue
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None or dtype is np.int64:
            continue
        start, end = meta["data_offsets"]
        out[key] = data[start:end].view(dtype).reshape(meta["shape"]).astype(np.float32)
    if keys is not None and keys - set(out):
        raise ModelNotFoundError(
            f"weights {p} lack tensors {sorted(keys - set(out))[:3]}; reinstall clipsearch"
        )
    return out


def _tokenizer(folder: Path, settings: dict[str, Any]) -> ClipTokenizer | HfTokenizer:
    kind = settings.get("kind")
    if kind == "clip-bpe":
        return ClipTokenizer(
            folder / settings["vocab"],
            context_length=int(settings["context_length"]),
            clean=str(settings.get("clean", "lower")),
        )
    if kind == "hf-tokenizers":
        strip = settings.get("strip_sep_id")
        return HfTokenizer(
            folder / settings["file"],
            context_length=int(settings["context_length"]),
            clean=str(settings.get("clean", "whitespace")),
            pad_id=int(settings.get("pad_id", 0)),
            strip_sep_id=None if strip is None else int(strip),
        )
    raise ConfigError(f"{folder}: unsupported tokenizer {kind!r}; re-export with this clipsearch")


def _providers(ort: Any, device: str) -> tuple[str, list[Any]]:
    available = set(ort.get_available_providers())
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r} for ONNX; expected auto, cpu, cuda, cuda:N")
    cuda = "CUDAExecutionProvider" in available
    if kind == "cuda" and not cuda:
        raise ConfigError(
            f"device {device!r} requested but onnxruntime has no CUDA provider "
            "(install onnxruntime-gpu) ; use --device cpu"
        )
    if kind == "cuda" or (kind == "auto" and cuda):
        opts = {"device_id": int(index or 0)}
        return f"cuda:{index or 0}", [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
    return "cpu", ["CPUExecutionProvider"]
