"""Data-parallel training: optimizers, the train/eval steps over a ``"data"`` mesh, the loop.

mesh = train.make_mesh()                                    # every device, axis "data"
tx = train.make_optimizer(train.OptimizerConfig(learning_rate=0.1))
schedule = train.make_schedule(config, total_steps)
state = train.create_train_state(arch, tx, seed=0, mesh=mesh)
step = train.make_train_step(arch, tx, schedule, mesh)
images, labels = train.global_batch(mesh, *local_batch)     # this process's rows -> global
state, metrics = step(state, images, labels)
"""

from jaxprune.train.batch_norm import recalibrate_batch_norm
from jaxprune.train.loop import LoopOptions, MetricsLog, TrainingDiverged, prefetch, train_loop
from jaxprune.train.optim import (
    OptimizerConfig,
    OptimizerName,
    ScheduleName,
    cross_entropy,
    make_optimizer,
    make_schedule,
)
from jaxprune.train.parallel import (
    DATA_AXIS,
    DistributedOptions,
    batch_sharding,
    check_batch_size,
    global_batch,
    initialize_distributed,
    is_primary,
    make_mesh,
    replicated,
)
from jaxprune.train.step import (
    ComputeDtype,
    GateAccumulator,
    StepOptions,
    TrainState,
    abstract_train_state,
    all_finite,
    create_train_state,
    make_eval_step,
    make_train_step,
    state_from_variables,
)

__all__ = [
    "recalibrate_batch_norm",
    "DATA_AXIS",
    "ComputeDtype",
    "DistributedOptions",
    "LoopOptions",
    "MetricsLog",
    "OptimizerConfig",
    "OptimizerName",
    "ScheduleName",
    "StepOptions",
    "GateAccumulator",
    "TrainState",
    "TrainingDiverged",
    "abstract_train_state",
    "all_finite",
    "batch_sharding",
    "check_batch_size",
    "create_train_state",
    "cross_entropy",
    "global_batch",
    "initialize_distributed",
    "is_primary",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "prefetch",
    "replicated",
    "state_from_variables",
    "train_loop",
]
