"""Configuration of a run, the budget of a pruning, and the errors a user can fix."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from jaxprune import data, methods, select
from jaxprune.train.optim import OptimizerConfig
from jaxprune.train.step import ComputeDtype

METRICS_FILE = "metrics.jsonl"
PRUNE_FILE = "prune.json"


class UserError(ValueError):
    """A problem with the user's input or files; the message is one readable line."""


class Phase(enum.StrEnum):
    """What produced a checkpoint."""

    TRAIN = "train"
    PRUNED = "pruned"
    FINETUNE = "finetune"


# One budget value from the command line to the selection (validated once, in select.Budget).
Budget = select.Budget
BudgetKind = select.BudgetKind


# Fields that only change how a run is operated, not what it computes; may differ on resume.
_OPERATIONAL = ("data_dir", "checkpoint_every", "log_every", "keep_checkpoints", "data_workers")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training (or fine-tuning) run.

    Attributes:
      model: a name of `jaxprune.models.names()`.
      data: a `jaxprune.data.DatasetName`.
      num_steps: length of the run in steps; exactly one of this and ``num_epochs``.
      num_epochs: length of the run in epochs (the last partial batch of each epoch is dropped).
      batch_size: global batch size (summed over devices and processes).
      seed: fixes the initialization, the data order and the augmentation.
      augment: apply the dataset's training augmentation (`jaxprune.data.datasets`) to the
        training batches.
      optimizer: optimizer and learning-rate schedule.
      label_smoothing: see `jaxprune.train.cross_entropy`.
      compute_dtype: activations in float32 or bfloat16 (parameters stay float32).
      synthetic: shape and size of the ``synthetic`` dataset.
      data_dir: where the data lives (see `jaxprune.data.load_dataset`).
      checkpoint_every: also save every this many steps (always: each epoch and the end).
      log_every: fetch metrics from the device this often.
      keep_checkpoints: how many recent checkpoints to keep.
      score_during_training: the name of a method with an accumulator (`jaxprune.methods`;
        ``"gfi"``: GFI-AP's mean |dL/dgate| over the training steps) whose scores the train
        step collects from its own backward pass; `prune` with that method then uses them.
      data_workers: processes decoding and augmenting batches (0: the training process);
        None: `jaxprune.data.default_num_workers`. The batches are the same for any value.
    """

    model: str
    data: str = data.DatasetName.FASHION_MNIST.value
    num_steps: int | None = None
    num_epochs: int | None = None
    batch_size: int = 128
    seed: int = 0
    augment: bool = True
    optimizer: OptimizerConfig = OptimizerConfig()
    label_smoothing: float = 0.0
    compute_dtype: ComputeDtype = ComputeDtype.FLOAT32
    synthetic: data.SyntheticOptions | None = None
    data_dir: str | None = None
    checkpoint_every: int | None = None
    log_every: int = 50
    keep_checkpoints: int = 3
    score_during_training: str | None = None
    data_workers: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "compute_dtype", ComputeDtype(self.compute_dtype))
        if self.score_during_training is not None and self.accumulator is None:
            collecting = [n for n, m in methods.METHODS.items() if m.accumulator is not None]
            raise UserError(
                f"method {self.score_during_training!r} has no scores to collect during training;"
                f" methods that do: {', '.join(collecting)}"
            )
        if (self.num_steps is None) == (self.num_epochs is None):
            raise UserError("give exactly one of num_steps and num_epochs")
        length = self.num_steps if self.num_steps is not None else self.num_epochs
        if length < 1:
            raise UserError(f"the run must be at least one step or epoch long, got {length}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise UserError(f"checkpoint_every must be positive, got {self.checkpoint_every}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.data_workers is not None and self.data_workers < 0:
            raise UserError(f"data_workers must be 0 or more, got {self.data_workers}")

    @property
    def accumulator(self):
        """The `jaxprune.train.GateAccumulator` of ``score_during_training`` (None: none)."""
        if self.score_during_training is None:
            return None
        return methods.get(self.score_during_training).accumulator

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["optimizer"] = self.optimizer.to_dict()
        out["compute_dtype"] = self.compute_dtype.value
        if self.synthetic is not None:
            out["synthetic"] = dataclasses.asdict(self.synthetic)
            out["synthetic"]["image_shape"] = list(self.synthetic.image_shape)
        return out

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> TrainConfig:
        fields = dict(fields)
        if fields.pop("collect_gfi", False):  # the name of this setting before 2026-11-30
            fields["score_during_training"] = "gfi"
        fields["optimizer"] = OptimizerConfig.from_dict(fields["optimizer"])
        if fields.get("synthetic") is not None:
            synthetic = dict(fields["synthetic"])
            synthetic["image_shape"] = tuple(synthetic["image_shape"])
            fields["synthetic"] = data.SyntheticOptions(**synthetic)
        return cls(**fields)

    def differences(self, other: TrainConfig) -> list[str]:
        """Names of the fields (other than operational ones) in which two runs differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k not in _OPERATIONAL and mine[k] != theirs[k]]
