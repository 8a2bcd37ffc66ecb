"""Evaluation metrics (torchmetrics, DDP-safe): top-k accuracy, per-group accuracy, relevance alignment."""

from cft_lightning.evaluation.metrics import GroupAccuracy, RankAccuracy, RelevanceAlignment, accuracy_metrics

__all__ = ["GroupAccuracy", "RankAccuracy", "RelevanceAlignment", "accuracy_metrics"]
