"""ONNX export of a model with a Hugging Face (BERT) text tower, tokenized without torch.

The tower, its WordPiece tokenizer and the CLIP model around it are built here from
scratch (tiny and random, nothing downloaded), the way the multilingual demo model's
text side is laid out: a folder with ``config.json`` and ``tokenizer.json``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from clipsearch.retrieval.encoders import load_encoder  # noqa: E402
from clipsearch.retrieval.encoders.hf_tokenizer import HfTokenizer  # noqa: E402
from clipsearch.retrieval.encoders.onnx import OnnxEncoder  # noqa: E402
from clipsearch.retrieval.encoders.onnx_export import export_onnx  # noqa: E402

HF_ARCH = "cs-test-tiny-hf"
WORDS = [
    "a",
    "the",
    "red",
    "blue",
    "green",
    "shirt",
    "dress",
    "shoes",
    "summer",
    "cotton",
    "linen",
    "cheap",
    "new",
    "红",
    "色",
    "裙",
    "夏",
]


def _tower_folder(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = [*WORDS, *"abcdefghijklmnopqrstuvwxyz0123456789", "##s", "##ed", "##ing", ".", ","]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + pieces))}  # ids 0..n-1
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    folder.mkdir(parents=True)
    fast.save_pretrained(folder)
    BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    ).save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class HfModel:
    weights: Path
    export: Path
    torch_encoder: object


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> HfModel:
    import open_clip
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hf-tower")
    tower = str(_tower_folder(root / "tower"))
    config = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "patch_size": 16,
            "head_width": 16,
        },
        "text_cfg": {
            "hf_model_name": tower,
            "hf_tokenizer_name": tower,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": 12,
        },
    }
    (root / f"{HF_ARCH}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{HF_ARCH}.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(HF_ARCH, pretrained=None, pretrained_text=False).eval()
    weights = root / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    export = root / "export"
    export_onnx(HF_ARCH, str(weights), out_dir=export)
    enc = load_encoder(HF_ARCH, str(weights), precision="fp32", backend="torch")
    return HfModel(weights, export, enc)


def _texts(n: int) -> list[str]:
    rng = random.Random(5)
    out = ["", "a red shirt", "RED  Shirts\tcheap!", "红色裙 夏", "unknownword zzz", "a " * 30]
    while len(out) < n:
        out.append(" ".join(rng.choice([*WORDS, "xyz", "Shirt,", "dressed"]) for _ in range(9)))
    return out


def test_hf_tokenizer_matches_open_clip(hf_model: HfModel) -> None:
    texts = _texts(200)
    reference = hf_model.torch_encoder.tokenizer  # type: ignore[attr-defined]
    manifest = json.loads((hf_model.export / "clipsearch-onnx.json").read_text())
    settings = manifest["tokenizer"]
    assert settings["kind"] == "hf-tokenizers" and settings["context_length"] == 12
    ours = HfTokenizer(
        hf_model.export / settings["file"], context_length=12, clean=settings["clean"]
    )
    ids, counts = ours.tokenize(texts)
    np.testing.assert_array_equal(ids, reference(texts).numpy())
    want = [hf_model.torch_encoder.count_tokens(t) for t in texts]  # type: ignore[attr-defined]
    assert counts.tolist() == want and max(want) > 12


def test_hf_tower_export_round_trip(hf_model: HfModel) -> None:
    onnx_enc = OnnxEncoder(hf_model.export)
    torch_enc = hf_model.torch_encoder
    texts = _texts(20)
    a, b = onnx_enc.encode_texts(texts), torch_enc.encode_texts(texts)  # type: ignore[attr-defined]
    assert ((a * b).sum(axis=1)).min() >= 0.999
    detailed = onnx_enc.encode_texts_detailed(texts)
    ref = torch_enc.encode_texts_detailed(texts)  # type: ignore[attr-defined]
    assert detailed.truncated.tolist() == ref.truncated.tolist()
    assert onnx_enc.fingerprint == torch_enc.fingerprint  # type: ignore[attr-defined]
