"""OpenClipEncoder on a tiny random model: loading, fingerprints, precision, offline errors."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clipsearch.retrieval.encoders import EncoderFingerprint, encoder_from_fingerprint, load_encoder
from clipsearch.retrieval.errors import (
    ConfigError,
    FingerprintMismatchError,
    ModelNotFoundError,
)
from tests.conftest import TINY_CONFIG, TinyCheckpoints, put_in_hf_cache, save_tiny_weights

torch = pytest.importorskip("torch")
from clipsearch.retrieval.encoders import openclip as oc  # noqa: E402
from clipsearch.retrieval.encoders.openclip import OpenClipEncoder  # noqa: E402


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    return [Image.new("RGB", (48, 32), "red"), Image.new("RGB", (32, 32), "blue"), noise]


TEXTS = ["a red shirt", "a blue dress", "green shoes on a white background"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints: TinyCheckpoints) -> OpenClipEncoder:
    return OpenClipEncoder(
        tiny_checkpoints.arch, pretrained=str(tiny_checkpoints.safetensors), precision="fp32"
    )


def test_outputs_are_unit_float32(tiny: OpenClipEncoder) -> None:
    img = tiny.encode_images(_images())
    txt = tiny.encode_texts(TEXTS)
    assert img.dtype == np.float32 and img.shape == (3, 32)
    assert txt.dtype == np.float32 and txt.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)


def test_normalize_false_keeps_raw_norms(tiny_checkpoints: TinyCheckpoints) -> None:
    raw = OpenClipEncoder(
        tiny_checkpoints.arch, pretrained=str(tiny_checkpoints.safetensors), normalize=False
    )
    assert raw.fingerprint.normalize is False
    norms = np.linalg.norm(raw.encode_texts(TEXTS), axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-3)


def test_batch_equals_single(tiny_checkpoints: TinyCheckpoints) -> None:
    enc = OpenClipEncoder(
        tiny_checkpoints.arch,
        pretrained=str(tiny_checkpoints.safetensors),
        batch_size=2,
        precision="fp32",  # the CPU's bf16 path is tested on its own below
    )
    images = _images()
    batched = enc.encode_images(images)
    single = np.concatenate([enc.encode_images([im]) for im in images])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    batched_t = enc.encode_texts(TEXTS)
    single_t = np.concatenate([enc.encode_texts([t]) for t in TEXTS])
    np.testing.assert_allclose(batched_t, single_t, atol=1e-5)


def test_checkpoint_round_trip_matches_in_memory_model(
    tiny_checkpoints: TinyCheckpoints, tiny: OpenClipEncoder
) -> None:
    import torch.nn.functional as F

    prepared = np.stack([tiny.prepare_image(im) for im in _images()])
    model = tiny_checkpoints.model
    with torch.inference_mode():
        want_img = F.normalize(model.encode_image(torch.from_numpy(prepared)), dim=-1).numpy()
        want_txt = F.normalize(model.encode_text(tiny.tokenizer(TEXTS)), dim=-1).numpy()
    for path in (
        tiny_checkpoints.safetensors,
        tiny_checkpoints.state_dict,
        tiny_checkpoints.wrapped,
    ):
        enc = OpenClipEncoder(tiny_checkpoints.arch, pretrained=str(path), precision="fp32")
        np.testing.assert_allclose(enc.encode_prepared(prepared), want_img, atol=1e-5)
        np.testing.assert_allclose(enc.encode_texts(TEXTS), want_txt, atol=1e-5)


def test_fingerprint_records_weights(
    tiny_checkpoints: TinyCheckpoints, tiny: OpenClipEncoder
) -> None:
    fp = tiny.fingerprint
    assert fp.kind == "open_clip"
    assert fp.arch == tiny_checkpoints.arch
    assert fp.pretrained == str(tiny_checkpoints.safetensors.resolve())
    assert (
        fp.weights_sha256 == hashlib.sha256(tiny_checkpoints.safetensors.read_bytes()).hexdigest()
    )
    assert fp.dim == TINY_CONFIG["embed_dim"]
    assert fp.image_size == 32 and fp.context_length == 16
    assert fp.tokenizer == "clip-bpe"
    assert (fp.interpolation, fp.resize_mode) == ("bicubic", "shortest")
    assert EncoderFingerprint.from_dict(json.loads(json.dumps(fp.to_dict()))) == fp


def test_fingerprint_is_stable_across_loads(
    tiny_checkpoints: TinyCheckpoints, tiny: OpenClipEncoder
) -> None:
    again = OpenClipEncoder(
        tiny_checkpoints.arch, pretrained=str(tiny_checkpoints.safetensors), precision="fp32"
    )
    assert again.fingerprint == tiny.fingerprint
    assert again.fingerprint.diff(tiny.fingerprint) == {}


def test_different_weights_change_the_fingerprint(tiny_arch: str, tmp_path: Path) -> None:
    first = save_tiny_weights(tiny_arch, tmp_path / "a", seed=1)
    enc_a = OpenClipEncoder(tiny_arch, pretrained=str(first.safetensors))
    # Replace the file at the same path with other weights (new inode, as a real update).
    second = save_tiny_weights(tiny_arch, tmp_path / "b", seed=2)
    os.replace(second.safetensors, first.safetensors)
    enc_b = OpenClipEncoder(tiny_arch, pretrained=str(first.safetensors))
    diff = enc_a.fingerprint.diff(enc_b.fingerprint)
    assert list(diff) == ["weights_sha256"]
    assert not np.allclose(enc_a.encode_texts(TEXTS), enc_b.encode_texts(TEXTS), atol=1e-3)


def test_encoder_from_fingerprint_detects_replaced_weights(tiny_arch: str, tmp_path: Path) -> None:
    ckpt = save_tiny_weights(tiny_arch, tmp_path / "a", seed=3)
    fp = OpenClipEncoder(tiny_arch, pretrained=str(ckpt.safetensors)).fingerprint
    assert encoder_from_fingerprint(fp).fingerprint == fp
    other = save_tiny_weights(tiny_arch, tmp_path / "b", seed=4)
    os.replace(other.safetensors, ckpt.safetensors)
    with pytest.raises(FingerprintMismatchError, match="weights_sha256"):
        encoder_from_fingerprint(fp)


def test_random_init_is_seeded(tiny_arch: str) -> None:
    a = OpenClipEncoder(tiny_arch, allow_random=True, precision="fp32")
    b = OpenClipEncoder(tiny_arch, allow_random=True, precision="fp32")
    assert a.fingerprint == b.fingerprint and a.fingerprint.weights_sha256 is None
    np.testing.assert_allclose(a.encode_texts(TEXTS), b.encode_texts(TEXTS), atol=1e-6)


def test_text_truncation_is_reported(
    tiny: OpenClipEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    long_text = " ".join(["shirt"] * 40)
    with caplog.at_level("WARNING", logger="clipsearch.retrieval.encoders.openclip"):
        out = tiny.encode_texts_detailed(["a red shirt", long_text])
    assert out.truncated.tolist() == [False, True]
    assert out.n_tokens[0] == 5  # <start> a red shirt <end>
    assert out.n_tokens[1] == 42
    assert "1 of 2 texts exceed the 16-token context" in caplog.text
    # The truncated text still encodes to a unit vector (its first 16 tokens).
    np.testing.assert_allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-5)


def test_prepare_image_handles_any_mode(tiny: OpenClipEncoder) -> None:
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    white = Image.new("RGB", (40, 30), "white")
    x = tiny.prepare_image(rgba)
    assert x.dtype == np.float32 and x.shape == (3, 32, 32)
    # Fully transparent pixels land on the white background, not black.
    np.testing.assert_allclose(x, tiny.prepare_image(white), atol=1e-6)


def test_encode_prepared_rejects_wrong_shape(tiny: OpenClipEncoder) -> None:
    with pytest.raises(ConfigError, match=r"\[n, 3, 32, 32\]"):
        tiny.encode_prepared(np.zeros((2, 3, 64, 64), np.float32))


def test_bf16_precision_close_to_fp32(
    tiny_checkpoints: TinyCheckpoints, tiny: OpenClipEncoder
) -> None:
    bf16 = OpenClipEncoder(
        tiny_checkpoints.arch, pretrained=str(tiny_checkpoints.safetensors), precision="bf16"
    )
    assert bf16.precision == "bf16" and bf16.fingerprint == tiny.fingerprint
    cos = (bf16.encode_images(_images()) * tiny.encode_images(_images())).sum(axis=1)
    assert cos.min() > 0.99


@pytest.mark.parametrize("precision", ["bf16", "bf16-weights"])
def test_bf16_paths_batch_like_single_and_stay_close_to_fp32(
    tiny_checkpoints: TinyCheckpoints, tiny: OpenClipEncoder, precision: str
) -> None:
    """Both bf16 paths, forced, whatever this CPU supports (emulated where not native)."""
    enc = OpenClipEncoder(
        tiny_checkpoints.arch,
        pretrained=str(tiny_checkpoints.safetensors),
        precision=precision,
        batch_size=2,
    )
    assert (enc.precision, enc.precision_reason) == (precision, "requested")
    images = _images()
    batched = enc.encode_images(images)
    single = np.concatenate([enc.encode_images([im]) for im in images])
    assert batched.dtype == np.float32
    np.testing.assert_allclose(batched, single, atol=2e-2)  # bf16 keeps ~3 digits
    assert (batched * tiny.encode_images(images)).sum(axis=1).min() > 0.99
    assert (enc.encode_texts(TEXTS) * tiny.encode_texts(TEXTS)).sum(axis=1).min() > 0.99


def test_auto_precision_is_measured_once_per_machine_and_model(
    tiny_checkpoints: TinyCheckpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipsearch.retrieval.encoders import precision as prec

    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(oc, "cpu_supports_bf16", lambda: True)
    calls = []

    def fake_probe(encoder: object) -> dict[str, dict[str, float]]:
        calls.append(encoder)
        # bf16 weights pay on batches only: queries and builds get different answers.
        return {
            "query": {"bf16": 0.5, "bf16-weights": 0.8},
            "build": {"bf16": 0.7, "bf16-weights": 1.4},
        }

    monkeypatch.setattr(prec, "probe", fake_probe)
    weights = str(tiny_checkpoints.safetensors)
    first = OpenClipEncoder(tiny_checkpoints.arch, pretrained=weights, purpose="build")
    assert first.precision == "bf16-weights" and len(calls) == 1
    assert first.precision_reason.startswith("auto for build: measured now")
    assert "4 items: bf16 0.70x fp32, bf16-weights 1.40x fp32" in first.precision_reason
    assert next(first.model.parameters()).dtype == torch.bfloat16
    again = OpenClipEncoder(tiny_checkpoints.arch, pretrained=weights, purpose="build")
    assert again.precision == "bf16-weights" and len(calls) == 1  # cached
    assert "measured earlier" in again.precision_reason
    query = OpenClipEncoder(tiny_checkpoints.arch, pretrained=weights)  # purpose="query"
    assert query.precision == "fp32" and len(calls) == 1  # the same probe, its 1-item ratios
    assert "1 item: bf16 0.50x fp32, bf16-weights 0.80x fp32" in query.precision_reason
    cached = json.loads((tmp_path / "precision.json").read_text())
    (entry,) = cached.values()
    assert entry["choices"] == {"query": "fp32", "build": "bf16-weights"}
    # An entry from the earlier probe format (one flat set of ratios) is measured again.
    (key,) = cached
    (tmp_path / "precision.json").write_text(
        json.dumps({key: {"precision": "bf16", "ratios": {"bf16": 2.0, "bf16-weights": 1.0}}})
    )
    assert OpenClipEncoder(tiny_checkpoints.arch, pretrained=weights).precision == "fp32"
    assert len(calls) == 2
    # Below MIN_GAIN (noise margin) fp32 stays.
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path / "other"))
    near = {"bf16": 0.6, "bf16-weights": 1.05}
    monkeypatch.setattr(prec, "probe", lambda e: {"query": near, "build": near})
    build = OpenClipEncoder(tiny_checkpoints.arch, pretrained=weights, purpose="build")
    assert build.precision == "fp32"
    # Without native bf16 nothing is measured.
    monkeypatch.setattr(oc, "cpu_supports_bf16", lambda: False)
    plain = OpenClipEncoder(tiny_checkpoints.arch, pretrained=weights)
    assert (plain.precision, plain.precision_reason) == (
        "fp32",
        "auto: fp32 (no native bf16 on this CPU)",
    )


def test_precision_probe_times_one_thread_per_size_and_stops_when_decisive(
    tiny_checkpoints: TinyCheckpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real probe on the tiny model, with its clock replaced: what it runs and returns."""
    import open_clip

    from clipsearch.retrieval.encoders import precision as prec

    enc = OpenClipEncoder(
        tiny_checkpoints.arch, pretrained=str(tiny_checkpoints.safetensors), precision="fp32"
    )
    calls: list[tuple[int, str, int]] = []  # (items, what ran, torch threads)
    real = open_clip.CLIP.encode_image

    def spy(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu"):
            what = "bf16"
        else:
            what = "bf16-weights" if next(self.parameters()).dtype == torch.bfloat16 else "fp32"
        calls.append((len(x), what, torch.get_num_threads()))
        return real(self, x, *args, **kwargs)

    # fp32 takes 1 s, autocast 0.5 s (2x: decisive after one round), bf16 weights 0.95 s
    # (1.05x: close to MIN_GAIN, so every round is timed).
    cost = {"fp32": 1.0, "bf16": 0.5, "bf16-weights": 0.95}

    def fake_cpu_seconds(fn: Any) -> float:
        fn()
        return cost[calls[-1][1]]

    monkeypatch.setattr(open_clip.CLIP, "encode_image", spy)
    monkeypatch.setattr(prec, "_cpu_seconds", fake_cpu_seconds)
    before = torch.get_num_threads()
    ratios = prec.probe(enc)
    assert torch.get_num_threads() == before  # restored
    assert ratios == {
        purpose: {"bf16": pytest.approx(2.0), "bf16-weights": pytest.approx(1 / 0.95)}
        for purpose in ("query", "build")
    }
    assert {threads for _, _, threads in calls} == {1}  # CPU time of one thread
    # Per size: one decisive autocast pair, then PROBE_REPEATS bf16-weights pairs.
    per_size = 2 + 2 * prec.PROBE_REPEATS
    build_items = prec.PROBE_ITEMS["build"]
    assert [n for n, _, _ in calls].count(build_items) == per_size
    assert [n for n, _, _ in calls].count(1) == 3 + per_size  # + one warm-up call each
    assert prec._pick(ratios["build"]) == "bf16"
    # Autocast far behind bf16 weights on one item is not timed on the batch.
    calls.clear()
    cost["bf16"] = 3.0
    ratios = prec.probe(enc)
    assert ratios["query"]["bf16"] == pytest.approx(1 / 3)
    assert ratios["build"] == {"bf16-weights": pytest.approx(1 / 0.95)}
    assert (build_items, "bf16", 1) not in calls
    assert prec._pick(ratios["build"]) == "fp32"


def test_precision_and_device_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert oc.resolve_precision("auto", "cuda") == "fp16"
    assert oc.resolve_precision("auto", "cuda:1") == "fp16"
    monkeypatch.setattr(oc, "cpu_supports_bf16", lambda: True)
    assert oc.resolve_precision("auto", "cpu") == "measure"  # native bf16 is not always faster
    monkeypatch.setattr(oc, "cpu_supports_bf16", lambda: False)
    assert oc.resolve_precision("auto", "cpu") == "fp32"
    assert oc.resolve_precision("fp32", "cuda") == "fp32"
    assert oc.resolve_precision("bf16-weights", "cpu") == "bf16-weights"
    with pytest.raises(ConfigError, match="unknown precision 'int8'"):
        oc.resolve_precision("int8", "cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        oc.resolve_device("tpu")
    if not torch.cuda.is_available():
        assert oc.resolve_device("auto") == "cpu"
        with pytest.raises(ConfigError, match="CUDA is not available"):
            oc.resolve_device("cuda")


def test_bad_batch_size(tiny_arch: str) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        OpenClipEncoder(tiny_arch, batch_size=0)


def test_checkpoint_for_other_architecture_is_a_clear_error(tiny_arch: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    bad = tmp_path / "other.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(
        ConfigError, match=r"cannot load model 'cs-test-tiny' from weights .*other.safetensors"
    ):
        OpenClipEncoder(tiny_arch, pretrained=str(bad))


def test_pickled_object_checkpoint_is_refused(tiny_arch: str, tmp_path: Path) -> None:
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Path("/etc")}, bad)
    with pytest.raises(ConfigError, match="not a plain state dict"):
        OpenClipEncoder(tiny_arch, pretrained=str(bad))


# --- weights that are not on this machine -------------------------------------------


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HuggingFace cache; the network is declared off so nothing can hang."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_uncached_tag_offline_names_model_place_and_fix(empty_hf_cache: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        load_encoder("vit-b-32")
    msg = str(info.value)
    assert "'ViT-B-32'" in msg and "'laion2b_s34b_b79k'" in msg
    assert str(empty_hf_cache / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K") in msg
    assert "HF_HUB_OFFLINE is set" in msg
    assert "--pretrained /path/to/file.safetensors" in msg
    assert "clipsearch models fetch ViT-B-32 --pretrained laion2b_s34b_b79k" in msg


def test_unreachable_hub_fails_fast_with_reason(
    empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def refuse(*args: object, **kwargs: object) -> socket.socket:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(
        ModelNotFoundError, match=r"cannot reach huggingface.co \(Network is unreachable\)"
    ):
        load_encoder("ViT-B-32", "laion2b_s34b_b79k")


def test_uncached_hub_model(empty_hf_cache: Path) -> None:
    with pytest.raises(
        ModelNotFoundError, match=r"hf-hub:someorg/some-clip.*models--someorg--some-clip"
    ):
        load_encoder("hf-hub:someorg/some-clip")


def test_missing_checkpoint_path(tiny_arch: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelNotFoundError, match=f"checkpoint file not found: {missing}"):
        load_encoder(tiny_arch, str(missing))


def test_folder_given_as_checkpoint(tiny_arch: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder; pass the weights file inside it"):
        load_encoder(tiny_arch, str(tmp_path))


def test_unknown_tag_and_arch(empty_hf_cache: Path) -> None:
    with pytest.raises(ConfigError, match="known tags: openai"):
        load_encoder("ViT-B-32", "laion9000")
    with pytest.raises(ConfigError, match="did you mean ViT-B-32"):
        load_encoder("ViT-B-33")


def test_cached_tag_loads_offline_with_tag_preprocessing(
    tiny_checkpoints: TinyCheckpoints, empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from open_clip import pretrained as oc_pretrained

    tag_cfg = {"hf_hub": "test-org/tiny-clip/", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    monkeypatch.setitem(oc_pretrained._PRETRAINED, tiny_checkpoints.arch, {"tinytag": tag_cfg})
    put_in_hf_cache(
        empty_hf_cache,
        "test-org/tiny-clip",
        "open_clip_pytorch_model.safetensors",
        tiny_checkpoints.safetensors.read_bytes(),
    )
    enc = load_encoder(tiny_checkpoints.arch, "TinyTag")
    fp = enc.fingerprint
    assert fp.pretrained == "tinytag"  # canonical spelling, as open_clip matches tags
    assert fp.image_mean == (0.5, 0.5, 0.5) and fp.image_std == (0.25, 0.25, 0.25)
    assert (
        fp.weights_sha256 == hashlib.sha256(tiny_checkpoints.safetensors.read_bytes()).hexdigest()
    )


def test_cached_hub_model_loads_offline(
    tiny_checkpoints: TinyCheckpoints, empty_hf_cache: Path
) -> None:
    from clipsearch.retrieval.encoders.catalog import list_models

    hub_config = {
        "model_cfg": TINY_CONFIG,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }
    data = tiny_checkpoints.safetensors.read_bytes()
    put_in_hf_cache(
        empty_hf_cache,
        "test-org/hub-tiny",
        "open_clip_config.json",
        json.dumps(hub_config).encode(),
    )
    put_in_hf_cache(empty_hf_cache, "test-org/hub-tiny", "open_clip_model.safetensors", data)

    # The hub repo as the architecture: config, preprocessing and weights all from it.
    enc = load_encoder("hf-hub:test-org/hub-tiny", precision="fp32")
    fp = enc.fingerprint
    assert (fp.arch, fp.pretrained) == ("hf-hub:test-org/hub-tiny", "hf-hub:test-org/hub-tiny")
    assert fp.image_mean == (0.5, 0.5, 0.5) and fp.dim == 32
    assert fp.weights_sha256 == hashlib.sha256(data).hexdigest()
    reference = OpenClipEncoder(
        tiny_checkpoints.arch, pretrained=str(tiny_checkpoints.safetensors), precision="fp32"
    )
    np.testing.assert_allclose(enc.encode_texts(TEXTS), reference.encode_texts(TEXTS), atol=1e-5)

    # The hub weights loaded into a named architecture keep the repo's preprocessing.
    named = load_encoder(tiny_checkpoints.arch, "hf-hub:test-org/hub-tiny")
    assert named.fingerprint.image_std == (0.5, 0.5, 0.5)
    assert named.fingerprint.pretrained == "hf-hub:test-org/hub-tiny"

    listed = [m for m in list_models() if m.source == "hf-cache"]
    assert [(m.name, m.offline) for m in listed] == [("hf-hub:test-org/hub-tiny", True)]

    with pytest.raises(ConfigError, match="brings its own weights"):
        load_encoder("hf-hub:test-org/hub-tiny", "laion2b_s34b_b79k")


def test_bundled_weights_are_recorded_as_bundled(
    tiny_checkpoints: TinyCheckpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clipsearch.retrieval.models as models

    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    (tmp_path / "cs-bundled-test.json").write_text(json.dumps(TINY_CONFIG))
    assert models.bundled_weights("cs-bundled-test") is None
    with pytest.raises(
        ModelNotFoundError, match=r"bundled weights for model 'cs-bundled-test' not found"
    ):
        load_encoder("cs-bundled-test", "bundled")
    (tmp_path / "cs-bundled-test.safetensors").write_bytes(
        tiny_checkpoints.safetensors.read_bytes()
    )
    assert models.register() == ["cs-bundled-test"]
    assert models.register() == ["cs-bundled-test"]  # idempotent
    enc = load_encoder("cs-bundled-test", "bundled")
    assert enc.fingerprint.pretrained == "bundled"
    assert (
        enc.fingerprint.weights_sha256
        == hashlib.sha256(tiny_checkpoints.safetensors.read_bytes()).hexdigest()
    )


def test_unbundled_model_names_the_missing_config() -> None:
    with pytest.raises(ModelNotFoundError, match=r"'cs-not-shipped' is not bundled"):
        load_encoder("cs-not-shipped", "bundled")


def test_prepare_image_is_thread_safe(tiny: OpenClipEncoder) -> None:
    from concurrent.futures import ThreadPoolExecutor

    images = _images() * 8
    serial = np.stack([tiny.prepare_image(im) for im in images])
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = np.stack(list(pool.map(tiny.prepare_image, images)))
    np.testing.assert_array_equal(parallel, serial)


@pytest.mark.gpu
def test_cuda_fp16_matches_cpu_fp32(
    tiny_checkpoints: TinyCheckpoints, tiny: OpenClipEncoder
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gpu = OpenClipEncoder(
        tiny_checkpoints.arch, pretrained=str(tiny_checkpoints.safetensors), precision="fp32"
    )
    assert (gpu.device, gpu.precision, gpu.batch_size) == ("cuda", "fp16", 256)
    assert gpu.fingerprint == tiny.fingerprint
    for a, b in (
        (gpu.encode_images(_images()), tiny.encode_images(_images())),
        (gpu.encode_texts(TEXTS), tiny.encode_texts(TEXTS)),
    ):
        assert a.dtype == np.float32
        assert (a * b).sum(axis=1).min() > 0.99
