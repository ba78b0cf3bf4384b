"""The contrastive training loop: symmetric InfoNCE, AdamW, warmup + cosine, validation.

:func:`train` runs (or resumes) a run described by a :class:`TrainConfig` and exports
the final weights with a model card. It reports through a ``progress`` callback and
logs; it never prints.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.indexer.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from clipsearch.indexer.training.config import TrainConfig
from clipsearch.indexer.training.data import (
    BatchPlan,
    CaptionSampler,
    Example,
    ImageBank,
    augment,
    fix_articles,
    load_examples,
    split_examples,
    step_rng,
)
from clipsearch.indexer.training.export import TOWER_DIR, export_model
from clipsearch.indexer.training.junk import junk_batch
from clipsearch.indexer.training.metrics import retrieval_metrics
from clipsearch.indexer.training.multilingual import cjk_token_ids, distill_tokens
from clipsearch.indexer.training.text_side import TextSide, is_hf_tower
from clipsearch.indexer.training.text_tower import (
    PreparedTower,
    open_clip_config,
    prepare_tower,
    read_token_list,
    text_state_dict,
)
from clipsearch.retrieval.errors import ConfigError
from clipsearch.retrieval.progress import Progress, ProgressCallback, ignore, within

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a finished (or deliberately stopped) run produced."""

    out_dir: Path
    # Exported weights and model card; None when the run stopped before the last step.
    model_path: Path | None
    card_path: Path | None
    # Steps done in total, and the step this invocation resumed from (0: fresh start).
    steps: int
    resumed_from: int
    # Training loss of every step, from step 0 (resumed runs include the earlier ones).
    losses: list[float]
    # Latest validation metrics (see retrieval_metrics); empty without a val split.
    metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "model_path": str(self.model_path) if self.model_path else None,
            "card_path": str(self.card_path) if self.card_path else None,
            "steps": self.steps,
            "resumed_from": self.resumed_from,
            "final_loss": self.losses[-1] if self.losses else None,
            "metrics": self.metrics,
            "wall_s": round(self.wall_s, 2),
        }


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine down to ``lr*min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    positives: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of normalised features ``[n, d]``.

    ``positives`` bool ``[n, n]`` marks every (image i, text j) pair that truly matches:
    the diagonal, plus pairs from the same product or with identical captions. The
    target distribution of a row spreads evenly over its positives, so a second photo of
    the same product is never pushed away as if it were a negative.
    """
    import torch.nn.functional as F

    logits = logit_scale.exp() * image_features @ text_features.T
    target = positives.float()
    # Images without any positive (synthetic junk, ``[n_images, n_texts]`` with extra
    # rows) only serve as negatives of every text: they take part in text->image.
    has = target.sum(1) > 0
    row = target[has] / target[has].sum(1, keepdim=True)
    i2t = -(row * F.log_softmax(logits[has], dim=1)).sum(1).mean()
    t2i = -(target.T / target.T.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (i2t + t2i) / 2


def train(
    cfg: TrainConfig,
    *,
    progress: ProgressCallback | None = None,
    stop_at_step: int | None = None,
    export_path: Path | None = None,
    command: str | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.manifest``; resume from the newest checkpoint if any.

    Args:
        progress: gets "load images" (train then validation images), "train" (steps;
            ``detail``: loss, lr and logit scale, the softmax's inverse temperature),
            "validate" (validations of this run; ``detail``: step and R@1 both ways;
            the full metrics are in the result) and "export" (models).
        stop_at_step: checkpoint and return after this many steps in total, as an
            interruption would (used to test that resuming is exact).
        export_path: also write the final weights here (e.g. the bundled model file).
        command: the command line, recorded in the model card.
    """
    import torch

    # Training seeds and, on resume, restores the global generators of python, numpy and
    # torch, and sets torch's thread count: put all of them back for the caller.
    threads = torch.get_num_threads()
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            return _train(cfg, progress, stop_at_step, export_path, command)
        finally:
            torch.set_num_threads(threads)
            random.setstate(py_state)
            np.random.set_state(np_state)


def _train(
    cfg: TrainConfig,
    progress: ProgressCallback | None,
    stop_at_step: int | None,
    export_path: Path | None,
    command: str | None,
) -> TrainResult:
    import torch

    t0 = time.monotonic()
    report = progress or ignore
    torch.set_num_threads(cfg.threads)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    built = _create_model(cfg)
    model, tokenizer, size, mean, std = (
        built.model,
        built.tokenizer,
        built.size,
        built.mean,
        built.std,
    )
    device = torch.device(cfg.device)
    examples = load_examples(cfg)
    train_set, val_set = split_examples(examples, val_fraction=cfg.val_fraction, seed=cfg.seed)
    if len(train_set) < 2:
        raise ConfigError(
            f"only {len(train_set)} training example(s) after the val split; need >= 2"
        )
    total_images = len(train_set) + len(val_set)
    bank = ImageBank(
        [e.image for e in train_set],
        size,
        progress=within(report, offset=0, total=total_images),
    )
    val_bank = None
    if val_set:
        val_progress = within(report, offset=len(train_set), total=total_images)
        val_bank = ImageBank([e.image for e in val_set], size, progress=val_progress)
    plan = BatchPlan(train_set, cfg)
    sampler = CaptionSampler(cfg.templates + tuple(t for t, _ in cfg.translations))
    labels, heads = _label_heads(cfg, train_set, model)
    if cfg.text_proj_lr == 0 and is_hf_tower(model):
        model.text.proj.requires_grad_(False)
    text_side = TextSide(model, tokenizer, locked=cfg.text_lr == 0, device=device)
    # One module holding the CLIP model and the label heads: optimised, checkpointed and
    # resumed together; only ``model`` is exported.
    trainee = torch.nn.ModuleDict({"model": model, "heads": heads}).to(device)
    optimizer = _optimizer(trainee, cfg)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    losses: list[float] = []
    metrics: dict[str, float] = {}
    start = 0
    ckpt_path = latest_checkpoint(cfg.out_dir)
    distilled: dict[str, float] = {}
    if ckpt_path is not None:
        start, losses, metrics, distilled = _resume(ckpt_path, cfg, trainee, optimizer, scaler)
    elif cfg.distill_steps and built.tower is not None:
        distilled = _distill(cfg, model, tokenizer, train_set, progress)
    norm = (torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1))
    groups = [e.group for e in train_set]
    end = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)
    n_validations = sum(
        1 for d in range(start + 1, end + 1) if d % cfg.val_every == 0 or d == cfg.steps
    )
    validations = 0
    report(Progress("train", start, cfg.steps, "steps"))
    model.train()
    text_side.train_mode()
    for step in range(start, end):
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        idx = plan.indices(step)
        cap_rng = step_rng(cfg.seed, step, "caption")
        captions = [sampler.sample(train_set[i], cap_rng) for i in idx]
        pixels = bank.images[torch.from_numpy(idx)].float() / 255.0
        if cfg.augment:
            pixels = augment(pixels, step_rng(cfg.seed, step, "augment"))
        positives = _positives(captions, [groups[i] for i in idx])
        if cfg.negative_images:
            junk = junk_batch(cfg.negative_images, step_rng(cfg.seed, step, "junk"), size=size)
            pixels = torch.cat([pixels, torch.from_numpy(junk).float() / 255.0])
            none = torch.zeros(cfg.negative_images, len(captions), dtype=torch.bool)
            positives = torch.cat([positives, none])
        pixels = ((pixels - norm[0]) / norm[1]).to(device)
        positives = positives.to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            img = model.encode_image(pixels, normalize=True)
            txt = text_side.encode(captions)
            loss = contrastive_loss(img.float(), txt.float(), model.logit_scale, positives)
            if labels:
                loss = loss + cfg.label_weight * _label_loss(
                    heads, img[: len(idx)].float(), labels, idx, device
                )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(cfg.max_logit_scale))
        losses.append(float(loss.item()))
        done = step + 1
        if done % 25 == 0:
            log.info("step %d/%d: loss %.4f, lr %.2e", done, cfg.steps, losses[-1], lr)
        scale = float(model.logit_scale.exp().item())
        detail = {"loss": losses[-1], "lr": lr, "logit scale": scale}
        report(Progress("train", done, cfg.steps, "steps", detail=detail))
        if val_bank is not None and (done % cfg.val_every == 0 or done == cfg.steps):
            metrics = validate(model, tokenizer, val_bank, val_set, sampler, norm, device)
            model.train()
            text_side.train_mode()
            log.info("step %d: %s", done, _fmt(metrics))
            validations += 1
            report(
                Progress(
                    "validate", validations, n_validations, "runs", detail=_headline(done, metrics)
                )
            )
        if done % cfg.checkpoint_every == 0 or done == end:
            save_checkpoint(
                cfg.out_dir,
                step=done,
                model=trainee,
                optimizer=optimizer,
                scaler_state=scaler.state_dict() if scaler is not None else None,
                state={
                    "config": cfg.resume_key(),
                    "losses": losses,
                    "metrics": metrics,
                    # What the new tokens' distillation reached, for the model card.
                    "distillation": distilled,
                },
                keep=cfg.keep_checkpoints,
            )
    steps_done = max(end, start)
    if steps_done < cfg.steps:
        return TrainResult(
            out_dir=cfg.out_dir,
            model_path=None,
            card_path=None,
            steps=steps_done,
            resumed_from=start,
            losses=losses,
            metrics=metrics,
            wall_s=time.monotonic() - t0,
        )
    report(Progress("export", 0, 1, "models"))
    model_path, card_path = export_model(
        model,
        cfg,
        out_dir=cfg.out_dir,
        export_path=export_path,
        architecture_config=built.config,
        tower=built.tower,
        card={
            "distillation": distilled,
            "train_examples": len(train_set),
            "val_examples": len(val_set),
            "final_loss": losses[-1] if losses else None,
            "val_metrics": metrics,
            "command": command,
            "wall_s_this_invocation": round(time.monotonic() - t0, 1),
        },
    )
    report(Progress("export", 1, 1, "models", detail={"path": str(model_path)}))
    return TrainResult(
        out_dir=cfg.out_dir,
        model_path=model_path,
        card_path=card_path,
        steps=cfg.steps,
        resumed_from=start,
        losses=losses,
        metrics=metrics,
        wall_s=time.monotonic() - t0,
    )


@dataclass(frozen=True, kw_only=True)
class BuiltModel:
    """The model a run trains, and how to feed it."""

    model: Any
    tokenizer: Any
    # Square input side and per-channel normalisation of the image tower.
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # The open_clip config the model was created from (recorded in the model card).
    config: dict[str, Any]
    # The prepared pretrained text tower, when --text-tower was given.
    tower: PreparedTower | None = None


def _create_model(cfg: TrainConfig) -> BuiltModel:
    """The open_clip model (from scratch, from ``cfg.pretrained``, and/or with a
    pretrained text tower), its tokenizer and preprocessing."""
    import open_clip

    from clipsearch.retrieval.encoders.weights import resolve_weights
    from clipsearch.retrieval.models import register

    register()
    resolved = resolve_weights(cfg.model, cfg.pretrained)
    weights = str(resolved.path) if resolved.path is not None else None
    tower = None
    if cfg.text_tower:
        model, name, tower = _create_with_tower(cfg, resolved.model_name, weights)
    else:
        name = resolved.model_name
        model = open_clip.create_model(name, pretrained=weights, device="cpu")
        if weights is None:
            model.logit_scale.data.fill_(cfg.init_logit_scale)
    tokenizer = open_clip.get_tokenizer(name)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size", 224)
    side = int(size if isinstance(size, int) else size[0])
    mean = tuple(float(x) for x in pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(x) for x in pp.get("std", open_clip.OPENAI_DATASET_STD))
    config = open_clip.get_model_config(name) or {}
    return BuiltModel(
        model=model,
        tokenizer=tokenizer,
        size=side,
        mean=mean,
        std=std,
        config=config,
        tower=tower,
    )


def _create_with_tower(
    cfg: TrainConfig, arch: str, weights: str | None
) -> tuple[Any, str, PreparedTower]:
    """``arch``'s image tower (its ``weights``' visual part, if any) with the pretrained
    text tower ``cfg.text_tower``, registered with open_clip as ``<arch>+text``."""
    import open_clip
    from safetensors.torch import load_file

    from clipsearch.retrieval.models import register_config

    base = open_clip.get_model_config(arch)
    if base is None:
        raise ConfigError(
            f"unknown architecture {cfg.model!r}; `clipsearch models list` shows them"
        )
    tower = prepare_tower(
        cfg.text_tower, cfg.out_dir / TOWER_DIR, add_tokens=read_token_list(cfg.add_tokens)
    )
    dim = cfg.embed_dim or tower.width
    config = open_clip_config(
        vision_cfg=base["vision_cfg"], embed_dim=dim, tower_ref=str(tower.folder.resolve())
    )
    name = f"{arch}+text"
    register_config(name, config)
    model = open_clip.create_model(name, device="cpu", pretrained_hf=False)
    state = text_state_dict(tower, dim)
    if weights is not None:
        own = load_file(weights) if weights.endswith(".safetensors") else {}
        state.update({k: v for k, v in own.items() if k.startswith("visual.")})
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k.startswith("text.")]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"text tower {cfg.text_tower!r} does not fit: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    model.logit_scale.data.fill_(cfg.init_logit_scale)
    return model, name, tower


def _distill(
    cfg: TrainConfig,
    model: Any,
    tokenizer: Any,
    train_set: Sequence[Example],
    progress: ProgressCallback | None,
) -> dict[str, float]:
    """Teach the new tokens on the translation pairs of the training examples."""
    pairs = {
        (fix_articles(t.format(**e.fields)), fix_articles(s.format(**e.fields)))
        for e in train_set
        for t, s in cfg.translations
    }
    return distill_tokens(
        model,
        tokenizer,
        sorted(pairs),
        token_ids=cjk_token_ids(tokenizer),
        steps=cfg.distill_steps,
        lr=cfg.distill_lr,
        seed=cfg.seed,
        progress=progress,
    )


# Label heads see unit-norm features; this fixed scale lets them reach confident logits
# without first growing their weights tenfold.
_LABEL_LOGIT_SCALE = 10.0


def _label_heads(
    cfg: TrainConfig, train_set: Sequence[Example], model: Any
) -> tuple[dict[str, torch.Tensor], torch.nn.ModuleDict]:
    """Per label column: class index of every training example, and a linear head."""
    import torch

    dim = int(model.visual.output_dim)
    labels: dict[str, torch.Tensor] = {}
    heads = torch.nn.ModuleDict()
    for col in cfg.label_columns:
        values = sorted({e.fields[col] for e in train_set})
        index = {v: i for i, v in enumerate(values)}
        labels[col] = torch.tensor([index[e.fields[col]] for e in train_set])
        heads[col] = torch.nn.Linear(dim, len(values))
    return labels, heads


def _label_loss(
    heads: torch.nn.ModuleDict,
    image_features: torch.Tensor,
    labels: dict[str, torch.Tensor],
    idx: np.ndarray,
    device: torch.device,
) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    rows = torch.from_numpy(idx)
    losses = [
        F.cross_entropy(_LABEL_LOGIT_SCALE * heads[col](image_features), y[rows].to(device))
        for col, y in labels.items()
    ]
    return torch.stack(losses).sum()


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; gains, biases and the temperature get no weight decay (as in CLIP)."""
    import torch

    # (weight decay, lr scale) -> parameters; the text tower may learn slower than the rest.
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        if ".text.transformer." in f".{name}" and cfg.text_lr is not None:
            scale = cfg.text_lr / cfg.lr
        elif ".text.proj." in f".{name}" and cfg.text_proj_lr is not None:
            scale = cfg.text_proj_lr / cfg.lr
        decays = not (p.ndim < 2 or "logit_scale" in name or name.endswith(".bias"))
        groups.setdefault((decays, scale), []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": cfg.weight_decay if decays else 0.0,
                "lr_scale": scale,
            }
            for (decays, scale), params in sorted(groups.items())
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        # The multi-tensor implementation is ~2x faster on CPU than the per-tensor loop.
        foreach=True,
    )


def _resume(
    path: Path,
    cfg: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
) -> tuple[int, list[float], dict[str, float], dict[str, float]]:
    ckpt = load_checkpoint(path)
    saved = ckpt.state.get("config", {})
    now = cfg.resume_key()
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ConfigError(
            f"checkpoint {path} was written with different settings ({', '.join(diff)}); "
            f"use the same options to resume, or a new --out folder to start over"
        )
    model.load_state_dict(ckpt.model)
    optimizer.load_state_dict(ckpt.optimizer)
    if scaler is not None and ckpt.state.get("scaler"):
        scaler.load_state_dict(ckpt.state["scaler"])
    restore_rng(ckpt)
    log.info("resumed from %s at step %d", path, ckpt.step)
    return (
        ckpt.step,
        list(ckpt.state.get("losses", [])),
        dict(ckpt.state.get("metrics", {})),
        dict(ckpt.state.get("distillation", {})),
    )


def _positives(captions: Sequence[str], groups: Sequence[str]) -> torch.Tensor:
    import torch

    cap = np.array(captions, dtype=object)
    grp = np.array(groups, dtype=object)
    same = (cap[:, None] == cap[None, :]) | (grp[:, None] == grp[None, :])
    return torch.from_numpy(same.astype(bool))


def validate(
    model: Any,
    tokenizer: Any,
    bank: ImageBank,
    examples: Sequence[Example],
    sampler: CaptionSampler,
    norm: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    batch_size: int = 256,
) -> dict[str, float]:
    """Retrieval metrics on held-out examples, each with its first caption option."""
    import torch

    model.eval()
    captions = [sampler.options(e)[0] for e in examples]
    distinct = list(dict.fromkeys(captions))
    img_out, txt_out = [], []
    with torch.no_grad():
        for s in range(0, len(bank), batch_size):
            pixels = bank.images[s : s + batch_size].float() / 255.0
            pixels = ((pixels - norm[0]) / norm[1]).to(device)
            img_out.append(model.encode_image(pixels, normalize=True).float().cpu().numpy())
        for s in range(0, len(distinct), batch_size):
            tokens = tokenizer(distinct[s : s + batch_size]).to(device)
            txt_out.append(model.encode_text(tokens, normalize=True).float().cpu().numpy())
    return retrieval_metrics(np.concatenate(img_out), np.concatenate(txt_out), captions)


def _headline(step: int, metrics: dict[str, float]) -> dict[str, float | int | str]:
    """What a person watching a run wants of a validation: R@1 both ways, in short."""
    short = {"image_to_text_R@1": "i2t R@1", "text_to_image_R@1": "t2i R@1"}
    headline: dict[str, float | int | str] = {"step": step}
    headline.update((name, metrics[key]) for key, name in short.items() if key in metrics)
    return headline


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())
