"""Export an open_clip model to ONNX (image and text towers) and check the export.

The torch side of the ONNX backend (see ``onnx.py`` for the folder layout). Uses
torch's TorchScript-based exporter (``dynamo=False``): it works offline without
onnxscript and handles every open_clip tower we ship. The export verifies itself:
sample images and texts (odd sizes, long and non-Latin texts) are embedded by torch in
fp32 and by onnxruntime, and every vector must agree at cosine >= ``min_cosine``
(0.999), or the export fails and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.retrieval.encoders.bpe import CLEAN_MODES, VOCAB_FILE, write_merges
from clipsearch.retrieval.encoders.hf_tokenizer import TOKENIZER_FILE
from clipsearch.retrieval.encoders.onnx import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    MANIFEST_NAME,
    OnnxEncoder,
    import_onnxruntime,
)
from clipsearch.retrieval.errors import ClipsearchError, ConfigError

log = logging.getLogger(__name__)

# Minimum per-vector cosine between torch (fp32) and ONNX outputs for an export to pass.
MIN_COSINE = 0.999
# int8 weights cost accuracy by design; an int8 export must still keep this cosine.
MIN_COSINE_INT8 = 0.98
# 17 is supported by every onnxruntime >= 1.14 and has every op the towers need.
OPSET = 17
# Texts of the self-check: short, long (truncated), accented, Chinese, emoji, empty.
CHECK_TEXTS = (
    "a photo of a red dress",
    "blue denim jacket with silver buttons, size M",
    "Crème brûlée & café au lait",
    "红色连衣裙 夏季 新款",
    "running shoes 👟 for trail runs",
    "",
    "a very long product description " * 20,
)


class ExportCheckError(ClipsearchError, RuntimeError):
    """The exported graphs do not reproduce the torch model's vectors."""


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how well it matched torch."""

    # The export folder.
    out_dir: Path
    # Lowest per-vector cosine to torch fp32, images and texts.
    image_min_cosine: float
    text_min_cosine: float
    # Total size of the folder, in bytes.
    n_bytes: int
    # "int8-dynamic" or None.
    quantized: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "image_min_cosine": self.image_min_cosine,
            "text_min_cosine": self.text_min_cosine,
            "n_bytes": self.n_bytes,
            "quantized": self.quantized,
        }


def export_onnx(
    model: str,
    pretrained: str | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    quantize: str | None = None,
    allow_random: bool = False,
    overwrite: bool = False,
) -> ExportReport:
    """Export ``model`` to ONNX in ``out_dir`` (default: the per-model cache folder).

    Args:
        model / pretrained: as for ``load_encoder``.
        out_dir: target folder; None uses the cache folder ``backend="auto"`` looks in.
        quantize: None, or ``"int8"`` for dynamic int8 quantisation of both towers
            (checked at cosine >= 0.98 instead of 0.999).
        allow_random: export a random initialisation (no weights): tests only.
        overwrite: replace an existing export in ``out_dir``.
    """
    from clipsearch.retrieval.encoders import load_encoder
    from clipsearch.retrieval.encoders.onnx import cache_dir_for
    from clipsearch.retrieval.encoders.openclip import OpenClipEncoder

    if quantize not in (None, "int8"):
        raise ConfigError(f"unknown quantization {quantize!r}; expected int8 or none")
    import_onnxruntime()
    enc = load_encoder(
        model,
        pretrained,
        device="cpu",
        precision="fp32",
        backend="torch",
        allow_random=allow_random,
    )
    if not isinstance(enc, OpenClipEncoder):
        raise ConfigError(f"only open_clip models can be exported to ONNX, not {model!r}")
    tokenizer = _tokenizer_settings(enc)
    if out_dir is None:
        target = cache_dir_for(enc.fingerprint)
        if target is None:
            raise ConfigError(
                f"{model!r} has no single weights file to key a cache folder by; pass --out DIR"
            )
    else:
        target = Path(out_dir)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"{target} exists and is not empty; pass --overwrite or another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        manifest = _write_export(enc, tmp, tokenizer, quantize)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        image_cos, text_cos = _check(enc, tmp, MIN_COSINE_INT8 if quantize else MIN_COSINE)
        manifest["check"].update(image_min_cosine=image_cos, text_min_cosine=text_cos)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is package-like data
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_bytes = sum(p.stat().st_size for p in target.iterdir())
    log.info(
        "exported %s to %s (%.1f MB; min cosine image %.5f, text %.5f)",
        enc.fingerprint.arch,
        target,
        n_bytes / 1e6,
        image_cos,
        text_cos,
    )
    return ExportReport(target, image_cos, text_cos, n_bytes, "int8-dynamic" if quantize else None)


def _tokenizer_settings(enc: Any) -> dict[str, Any]:
    """What the torch-free tokenizer needs to reproduce ``enc.tokenizer`` exactly."""
    tok = enc.tokenizer
    name = type(tok).__name__
    clean = getattr(getattr(tok, "clean_fn", None), "__name__", "").removeprefix("_clean_")
    if clean not in CLEAN_MODES:
        raise ConfigError(f"unknown text cleaning {tok.clean_fn!r} in {enc.fingerprint.arch!r}")
    if name == "SimpleTokenizer" and not getattr(tok, "reduction_fn", None):
        return {
            "kind": "clip-bpe",
            "vocab": VOCAB_FILE,
            "context_length": int(tok.context_length),
            "clean": clean,
        }
    inner: Any = getattr(tok, "tokenizer", None)
    if (
        name == "HFTokenizer"
        and inner is not None
        and not getattr(tok, "tokenizer_mode", "")
        and getattr(inner, "backend_tokenizer", None) is not None
    ):
        return {
            "kind": "hf-tokenizers",
            "file": TOKENIZER_FILE,
            "context_length": int(tok.context_length),
            "clean": clean,
            "pad_id": int(inner.pad_token_id or 0),
            "strip_sep_id": int(inner.sep_token_id) if tok.strip_sep_token else None,
        }
    raise ConfigError(
        f"{enc.fingerprint.arch!r} uses tokenizer {name}, which the ONNX backend does not "
        "reproduce (it supports CLIP's BPE and Hugging Face fast tokenizers in their "
        "standard mode); use --backend torch"
    )


def _save_tokenizer(enc: Any, settings: dict[str, Any], out: Path) -> None:
    if settings["kind"] == "clip-bpe":
        from open_clip.tokenizer import default_bpe

        write_merges(Path(default_bpe()), out / VOCAB_FILE)
    else:
        enc.tokenizer.tokenizer.backend_tokenizer.save(str(out / TOKENIZER_FILE))


def _write_export(
    enc: Any, out: Path, tokenizer: dict[str, Any], quantize: str | None
) -> dict[str, Any]:
    import onnxruntime
    import torch

    fp = enc.fingerprint
    model = enc.model.float().eval()
    # Bundled weights ship in the package: the export reads the tensors it shares with
    # them from that file instead of storing a second copy (see OnnxEncoder._open).
    link_to = enc.weights.path if enc.weights.label == "bundled" else None
    linked: dict[str, dict[str, str]] = {}
    image = torch.zeros(2, 3, fp.image_size, fp.image_size)
    text = torch.zeros(2, tokenizer["context_length"], dtype=torch.long)
    towers = {
        "image": (_tower(model.encode_image), image, "pixels"),
        "text": (_tower(model.encode_text), text, "tokens"),
    }
    # nn.MultiheadAttention's inference fast path is one fused op ONNX does not have.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for name, (module, example, input_name) in towers.items():
            _export_tower(module, example, input_name, out / f"{name}.onnx")
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    for name in towers:
        path = out / f"{name}.onnx"
        if quantize:
            _quantize_int8(path)
        else:
            linked[name] = _compact(path, link_to)
    _save_tokenizer(enc, tokenizer, out)
    scale = getattr(model, "logit_scale", None)
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "fingerprint": fp.to_dict(),
        "image_model": "image.onnx",
        "text_model": "text.onnx",
        "tokenizer": tokenizer,
        "preprocess": {
            "size": fp.image_size,
            "mean": list(fp.image_mean),
            "std": list(fp.image_std),
            "interpolation": fp.interpolation,
            "resize_mode": fp.resize_mode,
        },
        "logit_scale": float(scale.exp().item()) if scale is not None else None,
        "quantized": "int8-dynamic" if quantize else None,
        "opset": OPSET,
        "linked": (
            {"bundled": link_to.name, "towers": linked}
            if link_to is not None and any(linked.values())
            else None
        ),
        "check": {
            "against": "torch fp32",
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "min_cosine_required": MIN_COSINE_INT8 if quantize else MIN_COSINE,
        },
    }


def _export_tower(module: Any, example: Any, input_name: str, path: Path) -> None:
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which
        # needs onnxscript (not installed, and not needed for these towers); tracing
        # also warns about Python control flow that is constant for a given model.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Text pooling gathers at arange / argmax positions: never negative indices.
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=["embeddings"],
            dynamic_axes={input_name: {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _tower(method: Any) -> Any:
    """Wrap one bound ``encode_image`` / ``encode_text`` method as an ``nn.Module``."""
    import torch

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = method.__self__

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return getattr(self.model, method.__name__)(x)

    return Tower().eval()


def _compact(path: Path, link_to: Path | None) -> dict[str, str]:
    """Shrink an exported graph without changing a single weight value.

    Float32 initializers that are exactly fp16 values (weights trained or saved in
    fp16) are stored as fp16 and cast back by a ``Cast`` node that onnxruntime folds at
    load. Initializers equal to a tensor of ``link_to`` (a safetensors file) are not
    stored at all: they are marked external and supplied from that file at load.
    Returns ``{initializer name: safetensors key}`` of the linked ones.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from clipsearch.retrieval.encoders.onnx import read_safetensors

    source = read_safetensors(link_to) if link_to is not None else {}
    model = onnx.load(str(path))
    graph = model.graph
    linked: dict[str, str] = {}
    casts = []
    for init in list(graph.initializer):
        a = numpy_helper.to_array(init)
        key = init.name.removeprefix("model.")
        ref = source.get(key)
        if ref is not None and ref.shape == a.shape and np.array_equal(ref.astype(a.dtype), a):
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            for k, v in (
                ("location", "linked-weights"),
                ("offset", "0"),
                ("length", str(a.nbytes)),
            ):
                entry = init.external_data.add()
                entry.key, entry.value = k, v
            linked[init.name] = key
        elif a.dtype == np.float32 and a.size >= 1024:
            half = a.astype(np.float16)
            if np.array_equal(half.astype(np.float32), a):
                graph.initializer.remove(init)
                graph.initializer.append(numpy_helper.from_array(half, init.name + "__fp16"))
                casts.append(
                    helper.make_node(
                        "Cast", [init.name + "__fp16"], [init.name], to=TensorProto.FLOAT
                    )
                )
    for node in reversed(casts):
        graph.node.insert(0, node)
    onnx.save(model, str(path))
    return linked


def _quantize_int8(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(".int8.onnx")
    quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8)
    os.replace(tmp, path)


def check_images() -> list[Any]:
    """Sample images for the self-check: noise, gradients, odd sizes and aspect ratios."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for w, h in ((224, 224), (640, 480), (37, 301), (5, 5), (1000, 90)):
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        mixed = (0.5 * noise + 0.5 * ramp).astype(np.uint8)
        out.append(Image.fromarray(mixed, "RGB"))
    return out


def _check(enc: Any, folder: Path, min_cosine: float) -> tuple[float, float]:
    """Lowest per-vector cosine between torch and the export; raises below ``min_cosine``."""
    onnx_enc = OnnxEncoder(folder, device="cpu")
    images = check_images()
    batch = np.stack([enc.prepare_image(im) for im in images])
    ours = np.stack([onnx_enc.prepare_image(im) for im in images])
    if not np.allclose(batch, ours, atol=1e-5):
        raise ExportCheckError(
            f"numpy preprocessing differs from open_clip's for {enc.fingerprint.arch!r} "
            f"(max abs diff {float(np.abs(batch - ours).max()):.3g}); use --backend torch"
        )
    with _quiet("clipsearch.retrieval.encoders"):  # the long sample text is cut on purpose
        cos = {
            "image": _min_cosine(enc.encode_prepared(batch), onnx_enc.encode_prepared(batch)),
            "text": _min_cosine(
                enc.encode_texts(list(CHECK_TEXTS)), onnx_enc.encode_texts(list(CHECK_TEXTS))
            ),
        }
    for tower, value in cos.items():
        if not value >= min_cosine:
            raise ExportCheckError(
                f"the ONNX {tower} tower of {enc.fingerprint.arch!r} matches torch only at "
                f"cosine {value:.5f} < {min_cosine}; the export was not written. Report this "
                "model, or use --backend torch"
            )
    return cos["image"], cos["text"]


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence warnings of ``logger_name`` (and its children) for the block."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float(np.min(np.sum(a * b, axis=1)))
