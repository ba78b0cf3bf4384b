"""The CLI skeleton: --version, lazy imports, `models` and `embed`, via typer's CliRunner."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import clipsearch
from clipsearch.cli.app import app
from tests.conftest import TinyCheckpoints, put_in_hf_cache

runner = CliRunner()


@pytest.fixture
def offline_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HuggingFace cache and no network, as on a fresh offline machine."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"clipsearch {clipsearch.__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["models", "--help"],
        ["embed", "--help"],
        ["search", "--help"],
        ["index", "build", "--help"],
    ],
)
def test_help_does_not_import_heavy_modules(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from clipsearch.cli.app import app\n"
        f"result = CliRunner().invoke(app, {argv!r})\n"
        "assert result.exit_code == 0, result.output\n"
        "heavy = [m for m in ('torch', 'open_clip', 'faiss', 'fastapi') if m in sys.modules]\n"
        "print(','.join(heavy) or 'none')\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    )
    assert out.stdout.strip() == "none", out.stdout + out.stderr


def test_models_list_json_marks_offline_availability(offline_hf: Path) -> None:
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    by_key = {(r["name"], r["source"]): r for r in rows}
    vit = by_key[("vit-b-32", "preset")]
    assert vit["arch"] == "ViT-B-32" and vit["pretrained"] == "laion2b_s34b_b79k"
    assert vit["offline"] is False
    assert ("clipsearch-demo", "preset") in by_key
    tags = {r["pretrained"] for r in rows if r["arch"] == "ViT-B-32" and r["source"] == "open_clip"}
    assert {"openai", "laion2b_s34b_b79k"} <= tags


def test_models_list_table_and_offline_filter(offline_hf: Path) -> None:
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert "vit-b-32" in result.output and "available offline" in result.output
    only = runner.invoke(app, ["models", "list", "--offline", "--json"])
    assert only.exit_code == 0
    assert all(r["offline"] for r in json.loads(only.output))


def test_models_info_fake_json() -> None:
    result = runner.invoke(app, ["models", "info", "fake-32", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["dim"] == 32
    assert info["fingerprint"]["kind"] == "fake"


def test_models_info_checkpoint(tiny_checkpoints: TinyCheckpoints) -> None:
    args = [
        "models",
        "info",
        tiny_checkpoints.arch,
        "--pretrained",
        str(tiny_checkpoints.safetensors),
    ]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["dim"] == 32 and info["device"] == "cpu"
    assert info["n_parameters"] > 1_000_000
    assert info["fingerprint"]["weights_sha256"]
    table = runner.invoke(app, args)
    assert table.exit_code == 0
    assert "fingerprint.weights_sha256" in table.output


def test_models_fetch_offline_fails_cleanly(offline_hf: Path) -> None:
    result = runner.invoke(app, ["models", "fetch", "ViT-B-32", "--pretrained", "openai"])
    assert result.exit_code == 1
    assert "error:" in result.output
    assert "'ViT-B-32'" in result.output and "'openai'" in result.output
    assert "Traceback" not in result.output


def test_models_fetch_finds_cached_weights_and_list_marks_them(
    tiny_checkpoints: TinyCheckpoints, offline_hf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from open_clip import pretrained as oc_pretrained

    arch = tiny_checkpoints.arch
    monkeypatch.setitem(oc_pretrained._PRETRAINED, arch, {"tinytag": {"hf_hub": "test-org/tiny/"}})
    before = runner.invoke(app, ["models", "list", "--json"])
    assert {"name": arch, "pretrained": "tinytag", "offline": False}.items() <= next(
        r for r in json.loads(before.output) if r["name"] == arch
    ).items()
    data = tiny_checkpoints.safetensors.read_bytes()
    put_in_hf_cache(offline_hf, "test-org/tiny", "open_clip_pytorch_model.safetensors", data)

    result = runner.invoke(app, ["models", "fetch", arch, "--pretrained", "tinytag", "--json"])
    assert result.exit_code == 0, result.output
    fetched = json.loads(result.output)
    assert fetched["path"].startswith(str(offline_hf))
    assert fetched["sha256"] == hashlib.sha256(data).hexdigest()
    after = runner.invoke(app, ["models", "list", "--offline", "--json"])
    offline = {(r["name"], r["pretrained"]) for r in json.loads(after.output)}
    assert (arch, "tinytag") in offline
    assert ("vit-b-32", "laion2b_s34b_b79k") not in offline


def test_models_fetch_needs_a_tag() -> None:
    result = runner.invoke(app, ["models", "fetch", "ViT-B-32"])
    assert result.exit_code == 1
    assert "nothing to fetch" in result.output


def test_models_info_unknown_model_is_clean() -> None:
    result = runner.invoke(app, ["models", "info", "ViT-B-33"])
    assert result.exit_code == 1
    assert "unknown open_clip architecture 'ViT-B-33'" in result.output


def test_embed_fake_json(tmp_path: Path) -> None:
    red = tmp_path / "red.png"
    Image.new("RGB", (16, 16), "red").save(red)
    blue = tmp_path / "blue.png"
    Image.new("RGB", (16, 16), "blue").save(blue)
    args = ["embed", "--model", "fake", "--text", "a red shirt", "--image", str(red)]
    result = runner.invoke(app, [*args, "--image", str(blue), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert [i["modality"] for i in out["items"]] == ["text", "image", "image"]
    assert len(out["items"][0]["vector"]) == 64
    sim = out["similarity"]
    assert sim[0][1] > sim[0][2]  # "a red shirt" is closer to the red image
    assert sim[1][1] == pytest.approx(1.0, abs=1e-5)


def test_embed_table_and_truncation_warning(tiny_checkpoints: TinyCheckpoints) -> None:
    long_text = " ".join(["word"] * 30)
    result = runner.invoke(
        app,
        [
            "embed",
            "--model",
            tiny_checkpoints.arch,
            "--pretrained",
            str(tiny_checkpoints.safetensors),
            "-t",
            "red",
            "-t",
            long_text,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "cosine similarity" in result.output and "T1" in result.output
    assert "(truncated)" in result.output
    assert "1 text(s) exceed the model's 16-token context" in result.output


def test_embed_errors_are_clean(tmp_path: Path) -> None:
    nothing = runner.invoke(app, ["embed", "--model", "fake"])
    assert nothing.exit_code == 1 and "nothing to embed" in nothing.output
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    broken = runner.invoke(app, ["embed", "--model", "fake", "--image", str(bad)])
    assert broken.exit_code == 1
    assert "bad.jpg: cannot decode image" in broken.output
    assert "Traceback" not in broken.output


def test_models_export_onnx_then_embed_and_info_use_it(
    tiny_checkpoints: TinyCheckpoints, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    weights = str(tiny_checkpoints.safetensors)
    out = tmp_path / "tiny-onnx"
    args = ["models", "export", tiny_checkpoints.arch, "--pretrained", weights, "--out", str(out)]
    result = runner.invoke(app, [*args, "--format", "onnx", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["text_min_cosine"] >= 0.999 and report["image_min_cosine"] >= 0.999
    assert (out / "image.onnx").is_file() and (out / "clipsearch-onnx.json").is_file()
    again = runner.invoke(app, [*args, "--format", "onnx"])
    assert again.exit_code != 0 and "--overwrite" in again.output
    bad = runner.invoke(app, [*args, "--format", "tflite", "--overwrite"])
    assert bad.exit_code != 0 and "unknown format 'tflite'" in bad.output
    info = json.loads(runner.invoke(app, ["models", "info", str(out), "--json"]).output)
    assert info["backend"] == "onnx" and info["dim"] == 32
    embedded = runner.invoke(app, ["embed", "--model", str(out), "--text", "a red shirt", "--json"])
    assert embedded.exit_code == 0, embedded.output
    assert json.loads(embedded.output)["encoder"]["backend"] == "onnx"


def test_models_without_weights_need_random_weights_flag(tiny_arch: str) -> None:
    refused = runner.invoke(app, ["embed", "--model", tiny_arch, "--text", "a red shirt"])
    assert refused.exit_code != 0
    assert "--random-weights" in refused.output and "Traceback" not in refused.output
    args = ["embed", "--model", tiny_arch, "--text", "a red shirt", "--random-weights", "--json"]
    allowed = runner.invoke(app, [*args, "--backend", "torch", "--precision", "fp32"])
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.output)["encoder"]["pretrained"] == ""
    info = runner.invoke(app, ["models", "info", tiny_arch])
    assert info.exit_code != 0 and "--random-weights" in info.output
