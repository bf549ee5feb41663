"""Training LongSpec drafts: data, anchor-offset positions, objective, resumable trainer."""

from .objective import cross_attention_allowed, draft_loss, self_attention_allowed
from .positions import anchor_offset_positions
from .trainer import TrainConfig, run_recipe, train

__all__ = [
    "TrainConfig",
    "anchor_offset_positions",
    "cross_attention_allowed",
    "draft_loss",
    "run_recipe",
    "self_attention_allowed",
    "train",
]
