"""Training of embedding models: data loading (:mod:`latentembed.training.data`) and the trainer
(:mod:`latentembed.training.trainer`, ``python -m latentembed train``)."""

from .trainer import TrainConfig, train

__all__ = ["TrainConfig", "train"]
