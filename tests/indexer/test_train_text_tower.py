"""LiT training with a pretrained Hugging Face text tower: tokens added, Chinese distilled,
the tower locked, the export a bundled-style model that loads through the encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipsearch.indexer.demo.catalog import TRANSLATION_TEMPLATES
from clipsearch.indexer.demo.generate import generate_catalog
from clipsearch.indexer.training import TrainConfig, template_set, train
from clipsearch.indexer.training.text_tower import common_hanzi, prepare_tower, read_token_list
from clipsearch.retrieval.errors import ConfigError

pytest.importorskip("transformers")

# A tiny BERT vocabulary: specials, the demo catalog's English words, a few pieces.
_VOCAB = """[PAD] [unused0] [UNK] [CLS] [SEP] [MASK] a an photo of in with that is and
pattern t - shirt dress sneaker boot hat bag watch mug lamp chair red orange yellow green
blue purple pink brown black white plain striped dotted checked cotton linen organic silk
jersey canvas leather mesh suede rubber wool felt straw nylon strap silicone fabric
ceramic stoneware enamel paper velvet upholstered northwind aster & co bluefin cobalt lane
driftwood fjordline larkspur meridian oakhaven tidewater ##s ##ed"""
_WORDS = [w for line in _VOCAB.splitlines() for w in line.split(" ")]


def _tiny_bert(folder: Path) -> Path:
    """A randomly initialised 2-layer BERT in a Hugging Face folder (config, weights,
    tokenizer.json), standing in for MiniLM so the test runs in seconds."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(_WORDS)}
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config, add_pooling_layer=False)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text(config.to_json_string())
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 3), ("[SEP]", 4)]
    )
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizerFast"})
    )
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                "cls_token": "[CLS]", "mask_token": "[MASK]"}  # fmt: skip
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    return folder


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("tower") / "tiny-bert")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_catalog(tmp_path_factory.mktemp("cat"), products=24, seed=5).manifest


def test_added_tokens_grow_the_vocabulary_and_start_as_unk(tower: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    prepared = prepare_tower(str(tower), tmp_path / "t", add_tokens=["红", "色", "red"])
    assert (prepared.base_vocab, prepared.vocab_size) == (len(_WORDS), len(_WORDS) + 2)
    emb = prepared.state["embeddings.word_embeddings.weight"]
    assert emb.shape[0] == prepared.vocab_size
    unk = _WORDS.index("[UNK]")
    assert bool((emb[-2:] == emb[unk]).all())
    tok = Tokenizer.from_file(str(tmp_path / "t" / "tokenizer.json"))
    ids = tok.encode("红色 red").ids
    assert unk not in ids and ids[1:3] == [len(_WORDS), len(_WORDS) + 1]
    vocab = (tmp_path / "t" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[len(_WORDS)] == "红" and len(vocab) == prepared.vocab_size
    assert len(common_hanzi()) == 3755 and "红" in common_hanzi()
    with pytest.raises(ConfigError, match="zh-common"):
        read_token_list("no-such-set")


def _cfg(manifest: Path, out: Path, tower: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        manifest=manifest,
        out_dir=out,
        model="clipsearch-demo",
        caption_columns=("caption",),
        templates=template_set("shop")[:3],
        group_column="sku",
        text_tower=str(tower),
        add_tokens="zh-common",
        text_lr=0.0,
        translations=TRANSLATION_TEMPLATES[:3],
        distill_steps=4,
        distill_lr=5e-2,
        negative_images=2,
        steps=3,
        batch_size=8,
        lr=2e-3,
        warmup_steps=1,
        val_fraction=0.0,
        checkpoint_every=100,
        seed=3,
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_locked_tower_learns_only_chinese_rows_and_exports_a_bundled_model(
    catalog: Path, tower: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from clipsearch.retrieval.encoders.openclip import OpenClipEncoder
    from clipsearch.retrieval.models import register_config

    export = tmp_path / "bundle" / "shop-demo.safetensors"
    result = train(_cfg(catalog, tmp_path / "run", tower), export_path=export)
    card = json.loads(result.card_path.read_text())  # type: ignore[union-attr]
    assert card["distillation"]["cosine_after"] > card["distillation"]["cosine_before"]
    assert card["text_tower"]["added_tokens"] == 3755 - sum(c in _WORDS for c in common_hanzi())
    trained = load_file(str(result.model_path))
    original = load_file(str(tower / "model.safetensors"))
    emb = trained["text.transformer.embeddings.word_embeddings.weight"].float()
    base = len(_WORDS)
    # the locked tower's own rows and layers are untouched (up to the fp16 export)
    assert np.allclose(
        emb[:base].numpy(), original["embeddings.word_embeddings.weight"].numpy(), atol=2e-3
    )
    key = "encoder.layer.1.output.dense.weight"
    assert np.allclose(
        trained[f"text.transformer.{key}"].float().numpy(), original[key].numpy(), atol=2e-3
    )
    # the Chinese characters of the translation captions moved away from [UNK]
    unk = emb[_WORDS.index("[UNK]")]
    vocab = (export.parent / "shop_demo" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    moved = [
        c
        for c in "红色条纹"
        if not np.allclose(emb[vocab.index(c)].numpy(), unk.numpy(), atol=1e-3)
    ]
    assert moved, "distillation did not touch the Chinese tokens"
    # the bundled layout: config naming its tower folder, tokenizer, card
    config = json.loads(export.with_suffix(".json").read_text())
    assert config["text_cfg"]["hf_model_name"] == "bundled:shop_demo"
    assert (export.parent / "shop_demo" / "tokenizer.json").is_file()
    assert (export.parent / "shop_demo" / "model_card.json").is_file()
    # ... and the run folder's config loads through the normal encoder path
    register_config(
        "shop-demo-test", json.loads((tmp_path / "run" / "open_clip_config.json").read_text())
    )
    enc = OpenClipEncoder("shop-demo-test", pretrained=str(export), device="cpu", precision="fp32")
    vecs = enc.encode_texts(["a red striped mug", "红色条纹马克杯"])
    assert vecs.shape == (2, 32) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)


def test_locking_needs_a_hugging_face_tower(catalog: Path, tmp_path: Path, tiny_arch: str) -> None:
    cfg = TrainConfig(
        manifest=catalog, out_dir=tmp_path, model=tiny_arch, text_lr=0.0, steps=1, batch_size=4,
        val_fraction=0.0, threads=1,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="Hugging Face text tower"):
        train(cfg)
    with pytest.raises(ConfigError, match="need --text-tower"):
        TrainConfig(manifest=catalog, out_dir=tmp_path, add_tokens="zh-common")
    with pytest.raises(ConfigError, match="translation"):
        TrainConfig(manifest=catalog, out_dir=tmp_path, text_tower="minilm", distill_steps=3)
