"""Contrastive training and fine-tuning of open_clip models on (image, caption) manifests.

``train(TrainConfig(...))`` runs or resumes a run; see :mod:`clipsearch.indexer.training.loop`.
"""

from clipsearch.indexer.training.config import TrainConfig, template_set
from clipsearch.indexer.training.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "template_set", "train"]
