"""Contrastive training: the loss goes down, resume is exact, the export loads as an encoder."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.csv as pcsv
import pytest
from typer.testing import CliRunner

from clipsearch.cli.app import app
from clipsearch.indexer.demo.generate import generate_catalog
from clipsearch.indexer.training import TrainConfig, template_set, train
from clipsearch.indexer.training.data import BatchPlan, fix_articles, load_examples
from clipsearch.indexer.training.loop import lr_at
from clipsearch.indexer.training.metrics import retrieval_metrics
from clipsearch.retrieval.errors import ConfigError, SourceError
from clipsearch.retrieval.progress import Progress


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_catalog(tmp_path_factory.mktemp("catalog"), products=48, seed=5).manifest


def _cfg(manifest: Path, out: Path, arch: str, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        manifest=manifest,
        out_dir=out,
        model=arch,
        caption_columns=("caption",),
        templates=template_set("shop")[:4],
        group_column="sku",
        hard_negative_columns=("kind", "colour", "pattern"),
        hard_negative_fraction=0.5,
        steps=8,
        batch_size=16,
        lr=2e-3,
        warmup_steps=1,
        val_fraction=0.2,
        val_every=4,
        checkpoint_every=100,
        seed=3,
        # One thread: on a busy shared CPU, two OpenMP threads spin-wait on each other.
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_a_few_steps_lower_the_loss(tmp_path: Path, tiny_arch: str) -> None:
    # 12 products, batch 16: every step sees the whole set, so 30 steps must fit it.
    small = generate_catalog(tmp_path / "cat", products=12, seed=5).manifest
    cfg = _cfg(small, tmp_path / "run", tiny_arch, steps=30, lr=3e-3, augment=False,
               hard_negative_fraction=0.0, hard_negative_columns=(), templates=(),
               val_fraction=0.0)  # fmt: skip
    import random

    import torch

    threads, py_state, torch_state = (
        torch.get_num_threads(),
        random.getstate(),
        torch.get_rng_state(),
    )
    result = train(cfg)
    # the caller's thread count and random generators are left as they were
    assert torch.get_num_threads() == threads and random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    first, last = np.mean(result.losses[:3]), np.mean(result.losses[-3:])
    assert len(result.losses) == 30
    assert last < first * 0.8, result.losses


def test_resume_repeats_the_uninterrupted_run_exactly(
    catalog: Path, tmp_path: Path, tiny_arch: str
) -> None:
    # label heads too: their weights and optimiser state must round-trip as well
    whole = train(_cfg(catalog, tmp_path / "whole", tiny_arch, label_columns=("kind",)))
    cfg = _cfg(catalog, tmp_path / "split", tiny_arch, label_columns=("kind",))
    part = train(cfg, stop_at_step=3)
    assert part.steps == 3 and part.model_path is None
    seen: list[object] = []
    resumed = train(cfg, progress=seen.append)
    assert resumed.resumed_from == 3
    # the resumed run reports through the one Progress type, in stage order
    events = [e for e in seen if isinstance(e, Progress)]
    assert len(events) == len(seen)
    assert [s for s, _ in itertools.groupby(e.stage for e in events)] == [
        "load images", "train", "validate", "train", "validate", "export"
    ]  # fmt: skip
    assert all(e.total is not None and 0 <= e.done <= e.total for e in events)
    steps = [e for e in events if e.stage == "train"]
    assert [e.done for e in steps] == list(range(3, 9)) and steps[-1].total == 8
    assert steps[-1].detail["loss"] == resumed.losses[-1] and "lr" in steps[-1].detail
    images = [e for e in events if e.stage == "load images"][-1]
    assert images.done == images.total == len(load_examples(cfg))  # validation photos too
    assert resumed.losses == whole.losses  # bit-for-bit, not approximately
    assert resumed.metrics == whole.metrics
    from safetensors.torch import load_file

    a = load_file(str(whole.model_path))
    b = load_file(str(resumed.model_path))
    assert a.keys() == b.keys()
    assert all(bool((a[k] == b[k]).all()) for k in a)


def test_resume_with_other_settings_is_refused(
    catalog: Path, tmp_path: Path, tiny_arch: str
) -> None:
    train(_cfg(catalog, tmp_path, tiny_arch), stop_at_step=2)
    with pytest.raises(ConfigError, match="lr"):
        train(_cfg(catalog, tmp_path, tiny_arch, lr=5e-3))


def test_export_loads_through_the_encoder_with_its_fingerprint(
    catalog: Path, tmp_path: Path, tiny_arch: str
) -> None:
    from clipsearch.retrieval.encoders import load_encoder

    result = train(
        _cfg(catalog, tmp_path, tiny_arch, steps=2), export_path=tmp_path / "x" / "m.safetensors"
    )
    assert result.model_path is not None and result.card_path is not None
    card = json.loads(result.card_path.read_text())
    assert card["architecture"] == tiny_arch and card["training"]["steps"] == 2
    assert (tmp_path / "MODEL_CARD.md").read_text().startswith(f"# Model card: {tiny_arch}")
    assert (tmp_path / "x" / "m.safetensors").read_bytes() == result.model_path.read_bytes()
    enc = load_encoder(tiny_arch, str(result.model_path), device="cpu", precision="fp32")
    fp = enc.fingerprint
    assert fp.arch == tiny_arch and fp.kind == "open_clip"
    assert fp.weights_sha256 == card["weights_sha256"]
    assert fp.dim == 32 and fp.image_size == 32 and fp.context_length == 16
    vecs = enc.encode_texts(["a red striped mug", "a blue plain hat"])
    assert vecs.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)


def test_csv_manifest_and_missing_columns(tmp_path: Path, catalog: Path, tiny_arch: str) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(catalog).select(["image_path", "title"])
    # a CSV elsewhere: image paths are resolved against the manifest's own folder
    csv = catalog.parent / "pairs.csv"
    pcsv.write_csv(table, csv)
    cfg = _cfg(csv, tmp_path, tiny_arch, caption_columns=("title",), templates=(),
               group_column=None, hard_negative_columns=(), hard_negative_fraction=0.0)  # fmt: skip
    examples = load_examples(cfg)
    assert len(examples) == table.num_rows and examples[0].image.is_file()
    with pytest.raises(SourceError, match="lacks columns"):
        load_examples(_cfg(csv, tmp_path, tiny_arch))
    with pytest.raises(SourceError, match="not found"):
        load_examples(_cfg(tmp_path / "nope.parquet", tmp_path, tiny_arch))


def test_hard_negative_partners_differ_in_exactly_one_attribute(
    catalog: Path, tmp_path: Path
) -> None:
    cfg = _cfg(catalog, tmp_path, "clipsearch-demo", batch_size=32)
    examples = load_examples(cfg)
    plan = BatchPlan(examples, cfg)
    idx = plan.indices(5)
    assert len(idx) == 32 and np.array_equal(idx, plan.indices(5))
    anchors, partners = idx[: 32 - 8][:8], idx[32 - 8 :]
    differing = []
    for a, p in zip(anchors, partners, strict=True):
        va = [examples[a].fields[c] for c in cfg.hard_negative_columns]
        vp = [examples[p].fields[c] for c in cfg.hard_negative_columns]
        differing.append(sum(x != y for x, y in zip(va, vp, strict=True)))
    assert differing.count(1) >= 6  # a tiny catalog may lack a neighbour for a few anchors


def test_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(
        manifest=Path("m.parquet"), out_dir=Path("o"), steps=100, lr=1e-3, warmup_steps=10
    )
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 55) < lr_at(cfg, 20) < 1e-3
    assert lr_at(cfg, 99) == pytest.approx(1e-3 * cfg.min_lr_ratio, rel=0.05)


def test_metrics_of_a_perfect_and_a_reversed_model() -> None:
    eye = np.eye(4, dtype=np.float32)
    perfect = retrieval_metrics(eye, eye, ["a", "b", "c", "d"])
    assert perfect["image_to_text_R@1"] == perfect["text_to_image_R@1"] == 1.0
    assert perfect["image_to_text_median_rank"] == 1.0
    worst = retrieval_metrics(eye, 1 - eye, ["a", "b", "c", "d"])
    assert worst["image_to_text_R@1"] == 0.0 and worst["text_to_image_median_rank"] == 4.0


def test_articles_and_bad_options() -> None:
    assert fix_articles("a orange mug and a red hat") == "an orange mug and a red hat"
    with pytest.raises(ConfigError, match="batch-size"):
        TrainConfig(manifest=Path("m"), out_dir=Path("o"), batch_size=1)
    with pytest.raises(ConfigError, match="hard-negative-columns"):
        TrainConfig(manifest=Path("m"), out_dir=Path("o"), hard_negative_fraction=0.3)


def test_cli_train_runs_and_reports_json(catalog: Path, tmp_path: Path, tiny_arch: str) -> None:
    args = ["train", "--manifest", str(catalog), "--out", str(tmp_path), "--model", tiny_arch,
            "--template-set", "shop", "--group-column", "sku", "--steps", "3", "--batch-size", "8",
            "--val-every", "3", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["steps"] == 3 and Path(out["model_path"]).is_file()
    assert "image_to_text_R@1" in out["metrics"]
    bad = CliRunner().invoke(app, [*args[:-1], "--template-set", "nope"])
    assert bad.exit_code == 1 and "unknown template set" in bad.output


def test_hard_negative_vary_keeps_the_other_attributes(catalog: Path, tmp_path: Path) -> None:
    cfg = _cfg(catalog, tmp_path, "clipsearch-demo", batch_size=32, hard_negative_vary=("kind",))
    examples = load_examples(cfg)
    idx = BatchPlan(examples, cfg).indices(2)

    def look(i: int) -> tuple[str, str, str]:
        f = examples[i].fields
        return f["kind"], f["colour"], f["pattern"]

    twins_found = 0
    for a, p in zip(idx[:8], idx[24:], strict=True):
        has_twin = any(
            look(i)[1:] == look(a)[1:] and look(i)[0] != look(a)[0] for i in range(len(examples))
        )
        if has_twin:  # else the partner is random: a small catalog lacks some twins
            assert look(p)[1:] == look(a)[1:] and look(p)[0] != look(a)[0]
            twins_found += 1
    assert twins_found >= 2
    with pytest.raises(ConfigError, match="hard-negative-vary"):
        _cfg(catalog, tmp_path, "clipsearch-demo", hard_negative_vary=("brand",))
