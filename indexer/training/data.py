"""Training data: the (image, caption) manifest, captions, the image cache, batch order.

Every random choice of a step (which rows, which captions, which augmentations) is drawn
from ``numpy.random.default_rng([seed, step, stream])``, so batch ``s`` is a pure
function of the config and ``s``. That is what makes a resumed run repeat the
uninterrupted one exactly: the data position is just the step number.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.indexer.training.config import TrainConfig
from clipsearch.retrieval.errors import ImageDecodeError, SourceError
from clipsearch.retrieval.images import load_image
from clipsearch.retrieval.progress import Progress, ProgressCallback

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Streams of the per-step generator, so adding a random choice never shifts the others.
_ORDER, _HARD, _CAPTION, _AUGMENT, _JUNK = 0, 1, 2, 3, 4
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


@dataclass(frozen=True, kw_only=True)
class Example:
    """One manifest row usable for training."""

    image: Path
    # Fixed captions from the caption columns (non-empty strings only).
    captions: tuple[str, ...]
    # Values of every manifest column as strings, for templates and hard negatives.
    fields: dict[str, str]
    # Document key (group column value, or the row number).
    group: str


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet (``.parquet``), CSV (``.csv``) or JSON-lines (``.jsonl``) file."""
    if not path.is_file():
        raise SourceError(f"training manifest not found: {path}; pass an existing --manifest")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path).to_pylist()
        if suffix in (".jsonl", ".ndjson"):
            import pyarrow.json as pjson

            return pjson.read_json(path).to_pylist()
    except OSError as e:
        raise SourceError(f"cannot read training manifest {path}: {e}") from e
    except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) and others
        raise SourceError(f"training manifest {path} is malformed: {e}") from e
    raise SourceError(
        f"training manifest {path} has unknown format {suffix!r}; use .parquet, .csv or .jsonl"
    )


def load_examples(cfg: TrainConfig) -> list[Example]:
    """Read the manifest into examples, checking that the configured columns exist."""
    rows = read_manifest(cfg.manifest)
    if not rows:
        raise SourceError(f"training manifest {cfg.manifest} has no rows")
    columns = set(rows[0])
    wanted = {
        cfg.image_column,
        *cfg.caption_columns,
        *cfg.hard_negative_columns,
        *cfg.label_columns,
    }
    if cfg.group_column:
        wanted.add(cfg.group_column)
    for template in cfg.templates:
        wanted.update(
            name for _, name, _, _ in string.Formatter().parse(template) if name is not None
        )
    missing = sorted(wanted - columns)
    if missing:
        raise SourceError(
            f"training manifest {cfg.manifest} lacks columns {missing}; it has {sorted(columns)}"
        )
    root = cfg.manifest.resolve().parent
    examples = []
    for i, row in enumerate(rows):
        raw = row[cfg.image_column]
        if not raw:
            raise SourceError(f"{cfg.manifest} row {i}: empty {cfg.image_column!r}")
        image = Path(str(raw))
        captions = tuple(str(row[c]) for c in cfg.caption_columns if row[c])
        fields = {k: "" if v is None else str(v) for k, v in row.items()}
        group = fields[cfg.group_column] if cfg.group_column else str(i)
        examples.append(
            Example(
                image=image if image.is_absolute() else root / image,
                captions=captions,
                fields=fields,
                group=group,
            )
        )
    return examples


def split_examples(
    examples: Sequence[Example], *, val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out ``val_fraction`` of the groups (all photos of a product go to one side)."""
    groups = sorted({e.group for e in examples})
    n_val = round(len(groups) * val_fraction)
    if val_fraction > 0 and len(groups) >= 2:
        n_val = min(max(n_val, 1), len(groups) - 1)
    order = np.random.default_rng([seed, 7919]).permutation(len(groups))
    val_groups = {groups[i] for i in order[:n_val]}
    train = [e for e in examples if e.group not in val_groups]
    val = [e for e in examples if e.group in val_groups]
    return train, val


def fix_articles(text: str) -> str:
    """``a orange mug`` -> ``an orange mug``; templates need not know the article."""
    return _ARTICLE.sub(lambda m: m.group(1) + "n ", text)


class CaptionSampler:
    """Picks one caption per example: a caption column or a filled-in template."""

    def __init__(self, templates: Sequence[str]) -> None:
        self.templates = tuple(templates)

    def options(self, example: Example) -> list[str]:
        filled = [fix_articles(t.format(**example.fields)) for t in self.templates]
        return [c for c in (*example.captions, *filled) if c.strip()]

    def sample(self, example: Example, rng: np.random.Generator) -> str:
        opts = self.options(example)
        if not opts:
            raise SourceError(
                f"no caption for image {example.image}: its caption columns are empty"
            )
        return opts[int(rng.integers(len(opts)))]


class ImageBank:
    """Every training image decoded once, resized and centre-cropped to the model's size.

    Held as one uint8 tensor ``[n, 3, S, S]`` (S = model image size: 12 KB per image at
    64 px, 150 KB at 224 px), so that steps cost no decoding.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        size: int,
        *,
        progress: ProgressCallback | None = None,
    ) -> None:
        """``progress`` gets "load images" (images decoded, of ``len(paths)``)."""
        import torch

        data = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
        errors = []
        for i, path in enumerate(paths):
            try:
                data[i] = _square(load_image(path), size)
            except (ImageDecodeError, FileNotFoundError) as e:
                errors.append(f"{path}: {e}")
            if progress is not None and (i % 256 == 0 or i + 1 == len(paths)):
                progress(Progress("load images", i + 1, len(paths), "images"))
        if errors:
            shown = "; ".join(errors[:5])
            raise SourceError(
                f"{len(errors)} training image(s) could not be read ({shown}); "
                "fix or remove those rows from the manifest"
            )
        self.images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _square(image: Any, size: int) -> np.ndarray:
    """Resize the shortest side to ``size`` (bicubic) and centre-crop, as open_clip does."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


class BatchPlan:
    """Which example indices form batch ``step``: a pure function of (seed, step)."""

    def __init__(self, examples: Sequence[Example], cfg: TrainConfig) -> None:
        self.n = len(examples)
        self.seed = cfg.seed
        self.batch_size = min(cfg.batch_size, self.n)
        n_pairs = round(self.batch_size * cfg.hard_negative_fraction / 2)
        self.n_pairs = n_pairs if cfg.hard_negative_columns else 0
        # For column c: key (the other columns' values) -> example indices.
        self.neighbours: list[dict[tuple[str, ...], list[int]]] = []
        self.keys: list[list[tuple[str, ...]]] = []
        cols = cfg.hard_negative_columns
        for c in cols:
            table: dict[tuple[str, ...], list[int]] = {}
            keys = []
            for i, e in enumerate(examples):
                key = tuple(e.fields[o] for o in cols if o != c)
                table.setdefault(key, []).append(i)
                keys.append(key)
            self.neighbours.append(table)
            self.keys.append(keys)
        self.cols = cols
        vary = cfg.hard_negative_vary or cols
        self.vary = [i for i, c in enumerate(cols) if c in vary]
        self.values = [[e.fields[c] for c in cols] for e in examples]

    def indices(self, step: int) -> np.ndarray:
        stream_len = self.batch_size - self.n_pairs
        start = step * stream_len
        out = np.empty(stream_len, dtype=np.int64)
        for j in range(stream_len):
            epoch, pos = divmod(start + j, self.n)
            out[j] = self._permutation(epoch)[pos]
        if not self.n_pairs:
            return out
        rng = np.random.default_rng([self.seed, step, _HARD])
        partners = [self._partner(int(a), rng) for a in out[: self.n_pairs]]
        return np.concatenate([out, np.array(partners, dtype=np.int64)])

    def _permutation(self, epoch: int) -> np.ndarray:
        cached = getattr(self, "_perm_cache", None)
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch, _ORDER]).permutation(self.n)
            self._perm_cache = (epoch, perm)
            return perm
        return cached[1]

    def _partner(self, anchor: int, rng: np.random.Generator) -> int:
        """An example differing from ``anchor`` in exactly one hard-negative column."""
        for c in rng.permutation(self.vary):
            pool = self.neighbours[c][self.keys[c][anchor]]
            mine = self.values[anchor][c]
            different = [i for i in pool if self.values[i][c] != mine]
            if different:
                return different[int(rng.integers(len(different)))]
        return int(rng.integers(self.n))


def step_rng(seed: int, step: int, stream: str) -> np.random.Generator:
    """The generator of one random stream ("caption", "augment", "junk") at one step."""
    code = {"caption": _CAPTION, "augment": _AUGMENT, "junk": _JUNK}[stream]
    return np.random.default_rng([seed, step, code])


def augment(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random zoom/shift, horizontal flip, brightness and contrast on float [n,3,S,S] in [0,1].

    Hue and saturation are never touched: colour is a label the model must learn.
    """
    import torch
    import torch.nn.functional as F

    n = images.shape[0]
    scale = rng.uniform(0.8, 1.15, n)
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    shift = rng.uniform(-0.12, 0.12, (n, 2))
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(torch.from_numpy(theta), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = torch.from_numpy(rng.uniform(0.85, 1.15, (n, 1, 1, 1)).astype(np.float32))
    contrast = torch.from_numpy(rng.uniform(0.85, 1.15, (n, 1, 1, 1)).astype(np.float32))
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean
    return (out * brightness).clamp(0.0, 1.0)
