"""The torch-free tokenizer and image preprocessing give exactly what open_clip gives."""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.retrieval.encoders import load_image_for
from clipsearch.retrieval.encoders.bpe import ClipTokenizer
from clipsearch.retrieval.encoders.preprocess import ImagePreprocess
from clipsearch.retrieval.errors import ConfigError
from tests.conftest import TinyOnnx

pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

WORDS = [
    "a",
    "red",
    "shirt",
    "with",
    "white",
    "stripes",
    "size",
    "XL",
    "100%",
    "cotton",
    "don't",
    "we'll",
    "it's",
    "they're",
    "CAFÉ",
    "naïve",
    "résumé",
    "Straße",
    "ÆØÅ",
    "ñandú",
    "红色",
    "连衣裙",
    "夏季",
    "新款",
    "女装",
    "日本語",
    "テキスト",
    "한국어",
    "Привет",
    "мир",
    "مرحبا",
    "שלום",
    "😀",
    "👟",
    "❤️",
    "&amp;",
    "&lt;b&gt;",
    "&amp;amp;",
    "#hashtag",
    "@user",
    "3.14",
    "1,000",
    "e-mail",
    "C++",
    "<start_of_text>",
    "<end_of_text>",
    "...",
    "!!!",
    "???",
    "--",
    "__init__",
    "\t",
    "tab",
    "\n",
    "newline",
]


def _texts(n: int) -> list[str]:
    rng = random.Random(17)
    out = ["", " ", "a", "A photo of a DOG.", "  spaced   out\n\ttext  ", "x" * 500]
    out += ["word " * 100, "红色连衣裙" * 30, "mixed 红色 and 😀 emoji " * 8]
    while len(out) < n:
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))))
    return out


@pytest.mark.parametrize("context_length", [77, 16])
def test_tokenizer_matches_open_clip_on_300_texts(tiny_onnx: TinyOnnx, context_length: int) -> None:
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer(context_length=context_length)
    ours = ClipTokenizer(tiny_onnx.folder / "bpe_merges.txt", context_length=context_length)
    texts = _texts(300)
    ids, counts = ours.tokenize(texts)
    np.testing.assert_array_equal(ids, reference(texts).numpy())
    assert counts.tolist() == [len(reference.encode(t)) + 2 for t in texts]
    assert (counts > context_length).sum() >= 3  # long texts are in the sample


def test_tokenizer_rejects_bad_settings(tiny_onnx: TinyOnnx, tmp_path: Path) -> None:
    vocab = tiny_onnx.folder / "bpe_merges.txt"
    with pytest.raises(ConfigError, match="clean mode"):
        ClipTokenizer(vocab, context_length=16, clean="shout")
    with pytest.raises(FileNotFoundError, match="re-export"):
        ClipTokenizer(tmp_path / "missing.gz", context_length=16)


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w)[None, :] * np.ones((h, 1))
    y = np.linspace(255, 0, h)[:, None] * np.ones((1, w))
    rgb = np.stack([x, y, (x + y) / 2], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    return _save(_gradient(120, 60), "JPEG", exif=exif.tobytes())


def _sixteen_bit() -> bytes:
    a = (np.linspace(0, 65535, 70 * 30).reshape(30, 70)).astype(np.uint16)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    return _save(im, "PNG")


ODD_IMAGES: dict[str, Callable[[], bytes]] = {
    "tiny 1x1": lambda: _save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
    "tall 3x500": lambda: _save(_gradient(3, 500), "PNG"),
    "wide 900x7": lambda: _save(_gradient(900, 7), "PNG"),
    "huge jpeg 3000x2000": lambda: _save(_gradient(3000, 2000), "JPEG", quality=90),
    "grayscale": lambda: _save(_gradient(64, 48).convert("L"), "PNG"),
    "rgba": lambda: _save(_gradient(50, 80).convert("RGBA"), "PNG"),
    "palette with transparency": lambda: _save(
        _gradient(40, 40).convert("P"), "PNG", transparency=0
    ),
    "cmyk jpeg": lambda: _save(_gradient(70, 50).convert("CMYK"), "JPEG"),
    "16-bit png": _sixteen_bit,
    "exif rotated jpeg": _exif_rotated,
    "exact size": lambda: _save(_gradient(64, 64), "PNG"),
}


@pytest.fixture(scope="module")
def demo_torch() -> object:
    from clipsearch.retrieval.encoders import load_encoder

    return load_encoder("clipsearch-demo", device="cpu", precision="fp32", backend="torch")


@pytest.mark.parametrize("name", sorted(ODD_IMAGES))
def test_preprocessing_matches_open_clip_on_odd_images(
    name: str, demo_torch: object, tiny_onnx: TinyOnnx
) -> None:
    data = ODD_IMAGES[name]()
    for torch_enc in (demo_torch, tiny_onnx.torch_encoder):
        fp = torch_enc.fingerprint  # type: ignore[attr-defined]
        ours = ImagePreprocess(
            size=fp.image_size,
            mean=fp.image_mean,
            std=fp.image_std,
            interpolation=fp.interpolation,
            resize_mode=fp.resize_mode,
        )
        decoded = load_image_for(torch_enc, data)  # type: ignore[arg-type]
        want = torch_enc.prepare_image(decoded)  # type: ignore[attr-defined]
        got = ours(decoded)
        assert got.shape == want.shape == (3, fp.image_size, fp.image_size)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_exif_rotation_is_applied_once(demo_torch: object) -> None:
    decoded = load_image_for(demo_torch, _exif_rotated())  # type: ignore[arg-type]
    assert decoded.size == (60, 120)  # upright: portrait
    # Left column of the stored image (dark red) is the top row once upright.
    top = np.asarray(decoded)[0].mean(axis=0)
    assert top[0] < 40 and top[1] > 100


def test_squash_mode_and_unsupported_modes() -> None:
    pre = ImagePreprocess(size=8, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash")
    x = pre(_gradient(40, 10))
    assert x.shape == (3, 8, 8)
    with pytest.raises(ConfigError, match="use the torch backend"):
        ImagePreprocess(size=8, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="longest")
