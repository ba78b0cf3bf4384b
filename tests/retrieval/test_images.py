"""Safe decoding (load_image) and conversion to 8-bit RGB (to_rgb)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.retrieval.errors import ImageDecodeError
from clipsearch.retrieval.images import BACKGROUND, load_image, to_rgb


def _encode(im: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_exif_orientation_is_applied() -> None:
    # A 40x20 landscape picture, red on its left half, stored with "rotate 90 CW" (6).
    im = Image.new("RGB", (40, 20), "blue")
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_image(_encode(im, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)  # shown upright: portrait
    top = np.asarray(out)[2, 10]
    assert top[0] > 200 and top[2] < 60  # the red half is now on top


def test_rgba_is_composited_on_white() -> None:
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    im.putpixel((0, 0), (255, 0, 0, 255))
    out = to_rgb(im)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((3, 3)) == BACKGROUND


def test_half_transparent_pixel_blends() -> None:
    out = to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    r, g, b = out.getpixel((0, 0))
    assert 120 <= r <= 135 and r == g == b


def test_palette_with_transparency() -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 1  # palette index 1 (green) is transparent
    out = load_image(_encode(im))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((1, 0)) == BACKGROUND


def test_cmyk_jpeg_converts_to_rgb() -> None:
    im = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = load_image(_encode(im, "JPEG", quality=95))
    r, g, b = out.getpixel((4, 4))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16bit_grayscale_scales_by_nominal_range() -> None:
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    im = Image.fromarray(a)
    assert im.mode.startswith("I;16")
    out = load_image(_encode(im))
    values = [out.getpixel((x, 0))[0] for x in range(3)]
    assert values == [0, 128, 255]


def test_grayscale_and_la() -> None:
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    la = to_rgb(Image.new("LA", (1, 1), (0, 0)))
    assert la.getpixel((0, 0)) == BACKGROUND


def test_one_bit_and_float_images() -> None:
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    out = to_rgb(f)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_loads_from_path_and_file_object(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(_encode(Image.new("RGB", (3, 2), "green")))
    assert load_image(path).size == (3, 2)
    assert load_image(str(path)).size == (3, 2)
    with path.open("rb") as f:
        assert load_image(f).size == (3, 2)


def test_empty_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"empty\.jpg: file is empty"):
        load_image(empty)
    with pytest.raises(ImageDecodeError, match="empty input"):
        load_image(b"")


def test_truncated_file() -> None:
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        load_image(data[: len(data) // 2])


def test_non_image_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageDecodeError, match=r"notes\.jpg: cannot decode image"):
        load_image(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")


def test_pixel_limit_refuses_before_decoding() -> None:
    data = _encode(Image.new("L", (100, 100)))
    with pytest.raises(
        ImageDecodeError, match=r"100x100 = 10,000 pixels exceeds the limit of 5,000"
    ):
        load_image(data, max_pixels=5_000)
    assert load_image(data, max_pixels=10_000).size == (100, 100)


def test_decompression_bomb_band(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow's own warning band (MAX_IMAGE_PIXELS < pixels <= 2x) is refused too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    data = _encode(Image.new("L", (40, 40)))
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_image(data, max_pixels=10**9)


def test_absurd_dimensions() -> None:
    data = _encode(Image.new("1", (70_000, 1)))
    with pytest.raises(ImageDecodeError, match="absurd dimensions 70000x1"):
        load_image(data, max_pixels=10**9)


def _photo(w: int, h: int) -> Image.Image:
    """A smooth gradient photo (JPEG-friendly), red at the left, blue at the right."""
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    rgb = np.concatenate([255 * (1 - x) + 0 * y, 80 * y + 0 * x, 255 * x + 0 * y], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def test_min_side_decodes_a_large_jpeg_at_reduced_scale() -> None:
    data = _encode(_photo(1600, 1200), "JPEG", quality=90)
    full = load_image(data)
    small = load_image(data, min_side=256)
    assert full.size == (1600, 1200)
    # DCT scaling: the largest 1/2^k reduction that keeps both sides >= min_side
    assert small.size == (400, 300) and small.mode == "RGB"
    # same picture: the downscaled full decode matches the draft decode closely
    ref = np.asarray(full.resize(small.size, Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(ref - np.asarray(small, dtype=np.float32)).mean() < 3.0


def test_min_side_never_goes_below_the_requested_side_and_keeps_orientation() -> None:
    im = _photo(1200, 500)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _encode(im, "JPEG", exif=exif.tobytes())
    out = load_image(data, min_side=200)
    assert min(out.size) >= 200 and out.size == (250, 600)  # decoded 600x250, then rotated
    # PNG has no DCT scaling: min_side leaves it at full size
    assert load_image(_encode(_photo(800, 600)), min_side=100).size == (800, 600)


def _jpeg_with_app1(payload: bytes) -> bytes:
    """A valid 40x20 red JPEG whose EXIF (APP1) segment is ``payload``."""
    import struct

    data = _encode(Image.new("RGB", (40, 20), (220, 20, 20)), "JPEG", quality=95)
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + segment + data[2:]


# Like Pillow's own invalid-exif.jpg ("not a TIFF file") and truncated_exif_dpi.jpg
# ("unpack requires a buffer"): the pixels are fine, the EXIF block is not.
BROKEN_EXIF = {
    "not a tiff": b"Exif\x00\x00garbage-that-is-not-a-tiff-header",
    "truncated ifd": b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01",
    "ifd offset past the end": b"Exif\x00\x00MM\x00*\x00\x00\xff\xff",
}


@pytest.mark.parametrize("name", sorted(BROKEN_EXIF))
def test_broken_exif_is_ignored_and_the_image_still_embeds(name: str) -> None:
    from clipsearch.retrieval.encoders import FakeEncoder, load_image_for
    from clipsearch.retrieval.queries import encode_queries

    data = _jpeg_with_app1(BROKEN_EXIF[name])
    out = load_image(data)
    assert out.size == (40, 20) and out.mode == "RGB"
    assert np.asarray(out)[10, 20, 0] > 180  # red pixels decoded
    enc = FakeEncoder(32)
    # The index path (decode, then prepare) and the query path both embed it.
    vec = enc.encode_images([load_image_for(enc, data)])
    assert vec.shape == (1, 32) and np.isfinite(vec).all()
    q = encode_queries(enc, [data], 32)
    np.testing.assert_allclose(q, vec, atol=1e-6)


def test_exif_orientation_is_applied_once_on_the_encoder_path() -> None:
    """load_image turns the photo upright; the encoder's own steps must not turn it again."""
    from clipsearch.retrieval.encoders import FakeEncoder

    im = Image.new("RGB", (40, 20), "blue")
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(im, "JPEG", exif=exif, quality=95)
    upright = load_image(data)
    assert load_image(upright).size == (20, 40)  # a second pass changes nothing
    enc = FakeEncoder(32)
    once = enc.encode_images([upright])
    plain = Image.fromarray(np.asarray(upright))  # same pixels, no EXIF at all
    np.testing.assert_allclose(once, enc.encode_images([plain]), atol=1e-6)
    assert to_rgb(upright).size == (20, 40)
