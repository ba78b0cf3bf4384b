"""Evaluation metrics on hand-checked cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipsearch.retrieval.errors import SourceError
from clipsearch.retrieval.eval import pair_metrics, ranks_of_partners, read_pairs


def test_ranks_and_recall_on_a_known_case() -> None:
    eye = np.eye(4, dtype=np.float32)
    texts = eye[[0, 1, 3, 2]]  # pairs 2 and 3 are swapped
    assert ranks_of_partners(eye, texts).tolist() == [1, 1, 2, 2]
    m = pair_metrics(eye, texts)
    assert m["image_to_text"]["R@1"] == 0.5 and m["image_to_text"]["R@5"] == 1.0
    assert m["text_to_image"]["median_rank"] == 1.5 and m["text_to_image"]["mean_rank"] == 1.5


def test_pairs_files(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("image,text\na.png,a red shirt\n")
    assert read_pairs(tmp_path / "p.csv") == [(tmp_path / "a.png", "a red shirt")]
    (tmp_path / "bad.csv").write_text("image,caption\na.png,x\n")
    with pytest.raises(SourceError, match="row 1"):
        read_pairs(tmp_path / "bad.csv")
    with pytest.raises(SourceError):
        pair_metrics(np.eye(2, dtype=np.float32), np.eye(3, dtype=np.float32))
