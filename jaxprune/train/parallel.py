"""Data parallelism: a device mesh with one ``"data"`` axis, shardings, and multi-host start-up.

Parameters and optimizer state are replicated (``P()``) and every batch is split along its first
axis over the ``"data"`` axis (``P("data")``). Under `jax.jit` the model then computes on the
global batch as if it were on one device: XLA inserts the all-reduces of the gradient mean and of
BatchNorm's batch statistics. With several processes (hosts), each process loads only its rows of
the global batch and `global_batch` assembles the global array from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters, optimizer state and scalars: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: rows split over the ``"data"`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(mesh: Mesh, global_batch_size: int) -> None:
    """Refuses a global batch that does not split evenly over the mesh's devices."""
    if global_batch_size % mesh.size:
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the {mesh.size} devices"
        )


def global_batch(mesh: Mesh, *local_arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Global arrays sharded over ``"data"`` from this process's rows of each.

    Args:
      mesh: the data mesh.
      local_arrays: this process's consecutive rows of each global array (all of it on one host),
        as `jaxprune.data.train_batches(..., process_index, process_count)` yields them.

    Returns:
      One `jax.Array` per input, of global shape ``[rows * process_count, ...]``.
    """
    sharding = batch_sharding(mesh)
    return tuple(jax.make_array_from_process_local_data(sharding, a) for a in local_arrays)


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """How to join a multi-process run (all None: a single process, or auto-detected if `auto`).

    Attributes:
      coordinator_address: ``host:port`` of process 0's coordinator service.
      num_processes: number of processes.
      process_id: this process, in ``[0, num_processes)``.
      auto: call ``jax.distributed.initialize()`` with no arguments, which detects the cluster on
        Cloud TPU, Slurm and Open MPI.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator_address is not None


def initialize_distributed(options: DistributedOptions) -> None:
    """Starts `jax.distributed` when the options ask for it; must run before any computation.

    On CPU the processes exchange collectives over gloo (JAX's default CPU collectives), so a
    multi-process run can be tried on one machine with processes on localhost.
    """
    if not options.enabled:
        return
    if options.auto:
        jax.distributed.initialize()
        return
    if options.num_processes is None or options.process_id is None:
        raise ValueError("--coordinator-address needs --num-processes and --process-id")
    jax.distributed.initialize(
        options.coordinator_address,
        num_processes=options.num_processes,
        process_id=options.process_id,
    )


def is_primary() -> bool:
    """Whether this process writes logs and metrics (process 0)."""
    return jax.process_index() == 0
