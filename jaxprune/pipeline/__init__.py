"""The pruning pipeline as Python functions: train, prune, fine-tune, evaluate a workdir.

    result = pipeline.train(TrainConfig(model="lenet5", num_epochs=1), "/tmp/run")
    pipeline.prune("/tmp/run", "/tmp/pruned", "l1", Budget(BudgetKind.MACS, 0.5))
    pipeline.finetune("/tmp/pruned", num_epochs=1)
    pipeline.evaluate("/tmp/pruned")   # {"step", "accuracy", "loss", "macs", "params", ...}

A workdir holds ``checkpoints/`` (see `jaxprune.checkpoint`) and an append-only ``metrics.jsonl``.
Every checkpoint carries its architecture and configuration, so each function needs only the
workdir; a workdir that holds a checkpoint resumes from it. Problems the user can fix raise
`UserError` (or `CheckpointError`, `TrainingDiverged`) with a one-line message, before any work
when they can be known in advance.
"""

from jaxprune.pipeline.config import (
    METRICS_FILE,
    PRUNE_FILE,
    Budget,
    BudgetKind,
    Phase,
    TrainConfig,
    UserError,
)
from jaxprune.pipeline.pruning import (
    DEFAULT_RECALIBRATE_BATCHES,
    check_budget,
    check_method,
    prune,
    prune_to,
)
from jaxprune.pipeline.training import evaluate, finetune, load, train

__all__ = [
    "DEFAULT_RECALIBRATE_BATCHES",
    "METRICS_FILE",
    "PRUNE_FILE",
    "Budget",
    "BudgetKind",
    "Phase",
    "TrainConfig",
    "UserError",
    "check_budget",
    "check_method",
    "evaluate",
    "finetune",
    "load",
    "prune",
    "prune_to",
    "train",
]
