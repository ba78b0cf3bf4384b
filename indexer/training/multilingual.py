"""Teaching a pretrained text tower new tokens by distillation on translated captions.

MiniLM's vocabulary lacks almost every common Chinese character; they are added to the
tokenizer with embeddings copied from ``[UNK]`` (:mod:`.text_tower`). This step learns
them: for pairs (Chinese caption, English caption) such as ("红色条纹T恤", "a red
striped t-shirt"), only the rows of the token-embedding matrix that belong to CJK
characters are trained, so that the locked transformer embeds the Chinese caption where
it already embeds the English one. The English side never changes: the tower keeps
everything it knew, and Chinese queries land in the space the image tower is trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from clipsearch.retrieval.progress import Progress, ProgressCallback

log = logging.getLogger(__name__)

# Seed stream of the distillation's batches (the training loop uses 0-3).
_DISTILL = 5
# Softmax temperature of the in-batch contrastive term: a Chinese caption must be closer
# to its own English twin than to the other captions of the batch, not just near it.
_TEMPERATURE = 0.05


def cjk_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the vocabulary's single CJK-ideograph tokens."""
    vocab = tokenizer.tokenizer.get_vocab()
    return sorted(i for t, i in vocab.items() if len(t) == 1 and "\u4e00" <= t <= "\u9fff")


def distill_tokens(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    token_ids: Sequence[int],
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
    progress: ProgressCallback | None = None,
) -> dict[str, float]:
    """Train the embedding rows ``token_ids`` so ``target`` embeds like ``source``.

    ``pairs`` are (target, source) captions. Returns the mean cosine between the two
    sides over all pairs before and after (``cosine_before`` / ``cosine_after``).
    ``progress`` gets "distil tokens" (steps; ``detail``: loss).
    """
    import torch
    import torch.nn.functional as F

    from clipsearch.indexer.training.text_side import pooled_features

    text = model.text
    emb = text.transformer.get_input_embeddings().weight
    was = [(p, p.requires_grad) for p in text.parameters()]
    for p, _ in was:
        p.requires_grad_(False)
    emb.requires_grad_(True)
    rows = torch.zeros(emb.shape[0], 1)
    rows[torch.tensor(list(token_ids), dtype=torch.long)] = 1.0
    targets = [t for t, _ in pairs]
    sources = list(dict.fromkeys(s for _, s in pairs))
    text.transformer.eval()
    with torch.no_grad():
        src = torch.cat(
            [
                F.normalize(pooled_features(model, tokenizer(sources[i : i + 256])), dim=-1)
                for i in range(0, len(sources), 256)
            ]
        )
    src_index = {s: i for i, s in enumerate(sources)}
    src_of = torch.tensor([src_index[s] for _, s in pairs])
    before = _mean_cosine(model, tokenizer, targets, src[src_of])
    optimizer = torch.optim.Adam([emb], lr=lr)
    try:
        for step in range(steps):
            rng = np.random.default_rng([seed, step, _DISTILL])
            idx = rng.choice(len(pairs), size=min(batch_size, len(pairs)), replace=False)
            tokens = tokenizer([targets[i] for i in idx])
            out = F.normalize(pooled_features(model, tokens), dim=-1)
            goal = src[src_of[torch.from_numpy(idx)]]
            logits = out @ goal.T / _TEMPERATURE
            same = src_of[torch.from_numpy(idx)]
            positives = (same[:, None] == same[None, :]).float()
            nce = -(positives / positives.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1)
            loss = nce.mean() + (1 - (out * goal).sum(1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            assert emb.grad is not None
            emb.grad.mul_(rows)  # only the new (and CJK) rows move
            optimizer.step()
            if progress is not None:
                progress(
                    Progress(
                        "distil tokens", step + 1, steps, "steps", detail={"loss": float(loss)}
                    )
                )
            if (step + 1) % 50 == 0:
                log.info("distil step %d/%d: loss %.4f", step + 1, steps, float(loss))
    finally:
        for p, flag in was:
            p.requires_grad_(flag)
    after = _mean_cosine(model, tokenizer, targets, src[src_of])
    log.info("distilled %d pairs: cosine %.3f -> %.3f", len(pairs), before, after)
    return {"pairs": float(len(pairs)), "cosine_before": before, "cosine_after": after}


def _mean_cosine(model: Any, tokenizer: Any, texts: Sequence[str], goal: Any) -> float:
    import torch
    import torch.nn.functional as F

    from clipsearch.indexer.training.text_side import pooled_features

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 256):
            out.append(
                F.normalize(pooled_features(model, tokenizer(list(texts[i : i + 256]))), dim=-1)
            )
    return float((torch.cat(out) * goal).sum(1).mean())
