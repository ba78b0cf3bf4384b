"""The encoder protocol, fingerprints, presets and the deterministic FakeEncoder."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from clipsearch.retrieval.encoders import (
    PRESETS,
    Encoder,
    EncoderFingerprint,
    FakeEncoder,
    encoder_from_fingerprint,
    load_encoder,
    resolve_model_name,
)
from clipsearch.retrieval.errors import ConfigError


def _solid(colour: str, size: tuple[int, int] = (24, 24)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_fake_implements_protocol() -> None:
    enc = load_encoder("fake")
    assert isinstance(enc, Encoder)
    assert enc.dim == 64
    assert load_encoder("fake-32").dim == 32


def test_fake_outputs_are_normalised_float32() -> None:
    enc = FakeEncoder(48)
    img = enc.encode_images([_solid("red"), _solid("blue")])
    txt = enc.encode_texts(["red", "", "a navy coat"])
    for v in (img, txt):
        assert v.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    assert img.shape == (2, 48) and txt.shape == (3, 48)


def test_fake_batch_equals_single() -> None:
    enc = FakeEncoder(batch_size=2)
    images = [_solid("red"), _solid("green", (10, 30)), _solid("white")]
    single = np.concatenate([enc.encode_images([im]) for im in images])
    np.testing.assert_allclose(enc.encode_images(images), single, atol=1e-6)


def test_fake_colour_words_find_colour_images() -> None:
    enc = FakeEncoder()
    images = enc.encode_images([_solid("red"), _solid("blue"), _solid("green")])
    for i, query in enumerate(["a red shirt", "blue jeans", "green dress"]):
        scores = images @ enc.encode_texts([query])[0]
        assert int(scores.argmax()) == i, query


def test_fake_is_deterministic_and_seed_changes_it() -> None:
    a, b, c = FakeEncoder(seed=1), FakeEncoder(seed=1), FakeEncoder(seed=2)
    np.testing.assert_array_equal(a.encode_texts(["hello"]), b.encode_texts(["hello"]))
    assert not np.allclose(a.encode_texts(["hello"]), c.encode_texts(["hello"]))
    assert a.fingerprint == b.fingerprint
    assert list(a.fingerprint.diff(c.fingerprint)) == ["pretrained"]


def test_fake_reports_truncation() -> None:
    enc = FakeEncoder(context_length=5)  # room for 3 words
    out = enc.encode_texts_detailed(["red shirt", "one two three four five"])
    assert out.truncated.tolist() == [False, True]
    assert out.n_tokens.tolist() == [4, 7]


def test_encode_texts_refuses_a_bare_string() -> None:
    with pytest.raises(TypeError, match="not one string"):
        FakeEncoder().encode_texts("red")  # type: ignore[arg-type]


def test_fingerprint_json_round_trip_and_diff() -> None:
    fp = FakeEncoder(32, seed=3).fingerprint
    again = EncoderFingerprint.from_dict(json.loads(json.dumps(fp.to_dict())))
    assert again == fp
    changed = dataclasses.replace(fp, dim=64, tokenizer="other")
    assert fp.diff(changed) == {"dim": (32, 64), "tokenizer": ("fake-words", "other")}


def test_fingerprint_from_dict_rejects_unknown_fields() -> None:
    d = FakeEncoder().fingerprint.to_dict()
    d["future_field"] = 1
    with pytest.raises(ConfigError, match="future_field"):
        EncoderFingerprint.from_dict(d)


def test_encoder_from_fingerprint_recreates_fake() -> None:
    enc = FakeEncoder(40, seed=7)
    again = encoder_from_fingerprint(enc.fingerprint)
    np.testing.assert_array_equal(again.encode_texts(["red"]), enc.encode_texts(["red"]))


def test_fake_seed_must_be_an_integer() -> None:
    assert load_encoder("fake", "5").fingerprint == FakeEncoder(seed=5).fingerprint
    with pytest.raises(ConfigError, match="integer seed"):
        load_encoder("fake", "laion")


def test_resolve_model_name() -> None:
    assert resolve_model_name("vit-b-32") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert resolve_model_name("vit-b-32", "openai") == ("ViT-B-32", "openai")
    assert resolve_model_name("clipsearch-demo") == ("clipsearch-demo", "bundled")
    assert resolve_model_name("ViT-B-16") == ("ViT-B-16", "")
    assert all(p.arch and p.pretrained and p.description for p in PRESETS.values())
