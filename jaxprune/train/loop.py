"""The train loop: steps, an append-only metrics log, per-epoch evaluation, checkpoints, NaN stop.

The loop knows nothing of models or files: the caller gives it the jitted step, a batch iterator
that starts at the state's step, and callbacks that evaluate and save. Metrics stay on the device
and are fetched every ``log_every`` steps, so the host never waits for a step it just dispatched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import tqdm

from jaxprune.train.step import TrainState, all_finite


class TrainingDiverged(Exception):
    """A step's loss, gradient norm or parameters (or an evaluation) became NaN or infinite.

    Attributes:
      reason: what was not finite, at which step.
    The message adds what was kept.
    """

    def __init__(self, reason: str, kept: str = ""):
        super().__init__(f"{reason}; {kept}" if kept else reason)
        self.reason = reason


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, only ever appended (by process 0 only)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, *rows: dict) -> None:
        if not self.enabled or not rows:
            return
        text = "".join(json.dumps(_finite_or_none(row), allow_nan=False) + "\n" for row in rows)
        with self.path.open("a+b") as f:
            # A line torn by a crash stays alone on its line, never glued to the next row.
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = "\n" + text
            f.write(text.encode())

    def read(self) -> list[dict]:
        """Every row; an unreadable line (torn by a crash while it was written) is skipped."""
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


def _finite_or_none(row: dict) -> dict:
    """NaN and infinities become null, so every line is standard JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Runs ``iterator`` in a background thread, ``size`` items ahead, to overlap data and steps.

    Closing the returned generator (or its end) stops the thread and waits for it, so the source
    is closed (its worker processes stopped, their shared memory freed) before ``close`` returns,
    never racing interpreter exit.
    """
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        """Queues ``item`` unless the consumer has stopped; whether it was queued."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterator:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer.
            put(e)
        finally:
            # Stops the source's own workers (grain processes) from the thread that ran it.
            getattr(iterator, "close", lambda: None)()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # At most one item's wait: the producer checks `stop` between items.
        thread.join()


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """When the loop logs, evaluates, saves and stops.

    Attributes:
      end_step: the run's last step (exclusive): the number of steps of the whole run.
      steps_per_epoch: steps in one pass over the training split.
      checkpoint_every: save every this many steps (also at the end of every epoch and of the run).
      log_every: fetch metrics from the device (and check them for NaN) this often.
      stop_at: stop early at this step, saving, as a preempted run would (None: at ``end_step``).
      num_devices: written into every metrics row.
      progress: show a progress bar (None: only when stderr is a terminal).
      verbose: print the per-epoch summary lines (process 0).
    """

    end_step: int
    steps_per_epoch: int
    checkpoint_every: int | None = None
    log_every: int = 50
    stop_at: int | None = None
    num_devices: int = 1
    progress: bool | None = None
    verbose: bool = True


def train_loop(
    state: TrainState,
    train_step: Callable[..., tuple],
    batches: Iterator[tuple[jax.Array, jax.Array]],
    options: LoopOptions,
    *,
    log: MetricsLog,
    save: Callable[[TrainState], None],
    evaluate: Callable[[TrainState], dict[str, float]] | None = None,
    on_gate_grads: Callable[[int, Any], None] | None = None,
) -> TrainState:
    """Trains from ``state.step`` to the end (or ``stop_at``), saving and logging on the way.

    Args:
      state: the state to continue from; its step says where the run is.
      train_step: from `make_train_step`; donates its state argument.
      batches: global (images, labels) for steps ``state.step``, ``state.step + 1``, ...
      options: see `LoopOptions`.
      log: the run's metrics log; gets a row per step (``step``, ``loss``, ``accuracy`` of the batch
        before its update as ``train_accuracy``, ``learning_rate``, ``num_devices``) and a row per
        evaluation (``step``, ``accuracy``, ``loss``, ``split``, ``num_devices``).
      save: writes a checkpoint of a state (called only with finite parameters).
      evaluate: state -> ``{"accuracy", "loss"}`` on the held-out split, after each epoch and at
        the end of the run.
      on_gate_grads: receives ``(step, gate_grads)`` when the step collects gate gradients.

    Returns:
      The final state.

    Raises:
      TrainingDiverged: at the first non-finite loss (after logging the rows up to it); the
        checkpoints written so far are the last good ones.
    """
    start_step = int(jax.device_get(state.step))
    last_step = (
        options.end_step if options.stop_at is None else min(options.stop_at, options.end_step)
    )
    primary = log.enabled
    pending: list[tuple[int, dict]] = []
    last_saved: int | None = None
    summary = _EpochSummary(options.steps_per_epoch, options.end_step, options.verbose and primary)
    bar = tqdm.tqdm(
        total=options.end_step,
        initial=start_step,
        unit="step",
        dynamic_ncols=True,
        disable=(not primary) or (None if options.progress is None else not options.progress),
        leave=False,
    )

    def kept() -> str:
        if last_saved is None:
            return f"training stopped, no new checkpoint was written (started at step {start_step})"
        return f"training stopped, the last good checkpoint is step {last_saved}"

    def flush() -> None:
        if not pending:
            return
        fetched = jax.device_get([metrics for _, metrics in pending])
        rows = []
        for (step, _), metrics in zip(pending, fetched, strict=True):
            rows.append(
                {
                    "step": step,
                    "loss": float(metrics["loss"]),
                    "train_accuracy": float(metrics["accuracy"]),
                    "learning_rate": float(metrics["learning_rate"]),
                    "grad_norm": float(metrics["grad_norm"]),
                    "num_devices": options.num_devices,
                }
            )
        pending.clear()
        finite = [_finite(row, m) for row, m in zip(rows, fetched, strict=True)]
        bad = finite.index(False) if not all(finite) else None
        if bad is not None:
            log.write(*rows[: bad + 1])
            bar.close()
            raise TrainingDiverged(_what_diverged(rows[bad]), kept())
        log.write(*rows)
        summary.add(rows)
        bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", refresh=False)

    def checkpoint(state: TrainState) -> None:
        nonlocal last_saved
        flush()
        step = int(jax.device_get(state.step))
        if not all_finite((state.params, state.batch_stats, state.opt_state)):
            bar.close()
            raise TrainingDiverged(f"non-finite parameters after step {step - 1}", kept())
        save(state)
        last_saved = step

    in_flight: list[jax.Array] = []
    for step in range(start_step, last_step):
        images, labels = next(batches)
        outputs = train_step(state, images, labels)
        state, metrics = outputs[0], outputs[1]
        if on_gate_grads is not None and len(outputs) == 3:
            on_gate_grads(step, outputs[2])
        pending.append((step, metrics))
        # Keep at most two steps queued: bounded device memory, no stall.
        in_flight.append(metrics["loss"])
        if len(in_flight) > 2:
            in_flight.pop(0).block_until_ready()
        bar.update(1)
        done = step + 1
        end_of_epoch = done % options.steps_per_epoch == 0 or done == options.end_step
        if len(pending) >= options.log_every or end_of_epoch:
            flush()
        if end_of_epoch:
            result = evaluate(state) if evaluate is not None else {}
            if result:
                log.write(
                    {"step": done, **result, "split": "test", "num_devices": options.num_devices}
                )
                if not math.isfinite(result.get("loss", 0.0)):
                    bar.close()
                    raise TrainingDiverged(
                        f"the test loss is {result['loss']} after step {done - 1}", kept()
                    )
            summary.end_epoch(done, result, bar)
        if (
            done == last_step
            or end_of_epoch
            or (options.checkpoint_every and done % options.checkpoint_every == 0)
        ):
            checkpoint(state)
    flush()
    bar.close()
    return state


def _finite(row: dict, metrics: dict) -> bool:
    """Whether a step's loss and gradient norm, and the parameters it produced, are finite."""
    finite = math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
    # "finite" (from the step, on device): also the updated parameters and BatchNorm statistics.
    return finite and bool(metrics.get("finite", True))


def _what_diverged(row: dict) -> str:
    if not math.isfinite(row["loss"]):
        return f"loss is {row['loss']} at step {row['step']}"
    if not math.isfinite(row["grad_norm"]):
        return f"gradient norm is {row['grad_norm']} at step {row['step']}"
    return f"non-finite parameters after step {row['step']}"


class _EpochSummary:
    """Averages the logged rows of an epoch into one printed line."""

    def __init__(self, steps_per_epoch: int, end_step: int, enabled: bool):
        self.steps_per_epoch, self.end_step, self.enabled = steps_per_epoch, end_step, enabled
        self.rows: list[dict] = []
        self.start = time.perf_counter()

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)

    def end_epoch(self, done: int, result: dict, bar: tqdm.tqdm) -> None:
        if self.enabled and self.rows:
            epochs = -(-self.end_step // self.steps_per_epoch)
            epoch = -(-done // self.steps_per_epoch)
            n = len(self.rows)
            loss = sum(r["loss"] for r in self.rows) / n
            accuracy = sum(r["train_accuracy"] for r in self.rows) / n
            line = (
                f"epoch {epoch}/{epochs}  step {done}/{self.end_step}  loss {loss:.4f}  "
                f"train_acc {accuracy:.4f}"
            )
            first = self.rows[0]["step"]
            if first > (epoch - 1) * self.steps_per_epoch:
                # A resumed run has only its own steps of this epoch on the device.
                line += f" (of steps {first}-{done - 1} only: resumed)"
            if "accuracy" in result:
                line += f"  test_acc {result['accuracy']:.4f}  test_loss {result['loss']:.4f}"
            seconds = time.perf_counter() - self.start
            line += f"  lr {self.rows[-1]['learning_rate']:.4g}  {seconds:.1f}s"
            bar.write(line)
        self.rows = []
        self.start = time.perf_counter()
