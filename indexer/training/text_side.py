"""The text side of a training step: a trainable tower, or a locked one with a cache.

LiT ("locked-image text tuning", here the other way round: a locked *text* tower) keeps
a pretrained sentence encoder fixed and teaches the image tower to meet it. With the
transformer locked, a caption's pooled features never change, so each distinct caption
is encoded once and cached; a step then costs one small projection, not a transformer
forward and backward pass. The projection (``text.proj``) may still learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from clipsearch.retrieval.errors import ConfigError

if TYPE_CHECKING:
    import torch


def is_hf_tower(model: Any) -> bool:
    """True when the model's text tower is open_clip's Hugging Face adapter."""
    text = getattr(model, "text", None)
    return all(hasattr(text, a) for a in ("transformer", "pooler", "proj"))


def pooled_features(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Mean-pooled transformer output ``[n, width]`` before the projection (HF towers)."""
    text = model.text
    mask = (tokens != text.config.pad_token_id).long()
    out = text.transformer(input_ids=tokens, attention_mask=mask)
    pooled: torch.Tensor = text.pooler(out, mask)
    return pooled


class TextSide:
    """Encodes a batch of captions for the loss, caching when the transformer is locked."""

    def __init__(self, model: Any, tokenizer: Any, *, locked: bool, device: Any) -> None:
        if locked and not is_hf_tower(model):
            raise ConfigError(
                "--text-lr 0 (a locked text tower) needs a Hugging Face text tower; "
                "pass --text-tower minilm or a model whose text_cfg has hf_model_name"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.locked = locked
        self.device = device
        self._cache: dict[str, torch.Tensor] = {}
        if locked:
            for p in model.text.transformer.parameters():
                p.requires_grad_(False)

    def train_mode(self) -> None:
        """Training mode, except for a pretrained HF transformer, which never drops out:
        its sentence space is what the image tower must learn to meet."""
        if is_hf_tower(self.model):
            self.model.text.transformer.eval()

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Normalised text features ``[n, dim]`` with gradients where parameters learn."""
        import torch
        import torch.nn.functional as F

        if not self.locked:
            tokens = self.tokenizer(list(captions)).to(self.device)
            return F.normalize(self.model.encode_text(tokens), dim=-1)
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            with torch.no_grad():
                feats = pooled_features(self.model, self.tokenizer(missing).to(self.device))
            self._cache.update(zip(missing, feats.float(), strict=True))
        pooled = torch.stack([self._cache[c] for c in captions])
        return F.normalize(self.model.text.proj(pooled), dim=-1)

    def forget(self) -> None:
        """Drop cached features (after the transformer's weights changed)."""
        self._cache.clear()
