"""Checkpoints: exact resume, refusal of corrupt checkpoints, pruned checkpoints restore alone."""

import hashlib
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import checkpoint, data, pipeline, train
from jaxprune.pipeline import run_loop

CONFIG = pipeline.TrainConfig(
    model="resnet20",  # The smallest model with BatchNorm: its running statistics must resume too.
    data="synthetic",
    synthetic=data.SyntheticOptions((8, 8, 3), 10, num_train=96, num_test=40),
    num_steps=10,  # 6 steps per epoch: an epoch boundary, an evaluation, saves at 4, 6, 8, 10.
    batch_size=16,
    checkpoint_every=4,
    optimizer=train.OptimizerConfig(learning_rate=0.02),
    score_during_training="gfi",
)


def _state(workdir, step=None):
    """(architecture, state) of a workdir's checkpoint, restored with nothing but the workdir."""
    step = checkpoint.latest_step(workdir) if step is None else step
    meta = checkpoint.read_meta(workdir, step)
    arch = jp.models.from_dict(meta["arch"])
    optimizer = train.OptimizerConfig.from_dict(meta["config"]["optimizer"])
    target = train.abstract_train_state(
        arch, train.make_optimizer(optimizer), train.make_mesh(), CONFIG.accumulator
    )
    return arch, checkpoint.restore(workdir, step, target)


def _snapshot(directory: Path) -> dict[str, str]:
    """Every path under ``directory`` -> sha256 of its bytes ('dir' for directories)."""
    return {
        str(p.relative_to(directory)): "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and the same run stopped at step 5 and resumed."""
    root = tmp_path_factory.mktemp("runs")
    steps_built = []
    run_loop.train_step_for.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_loop, "make_train_step", _recorder(run_loop.make_train_step, steps_built))
        whole = pipeline.train(CONFIG, root / "whole", progress=False, verbose=False)
        first = pipeline.train(CONFIG, root / "split", stop_at=5, progress=False, verbose=False)
        second = pipeline.train(CONFIG, root / "split", progress=False, verbose=False)
    return {
        "whole": root / "whole",
        "split": root / "split",
        "results": (whole, first, second),
        "steps_built": steps_built,
    }


def _recorder(make_train_step, built):
    def make(*args, **kwargs):
        step = make_train_step(*args, **kwargs)
        built.append(step)
        return step

    return make


def test_a_run_split_in_two_equals_an_uninterrupted_run(runs):
    whole, first, second = runs["results"]
    assert first["step"] == 5 and whole["step"] == second["step"] == 10
    assert checkpoint.steps(runs["split"]) == [6, 8, 10]  # 5 was the 4th newest
    assert checkpoint.steps(runs["whole"]) == [6, 8, 10]  # 3 kept
    rows = {
        name: train.MetricsLog(runs[name] / "metrics.jsonl").read() for name in ("whole", "split")
    }
    assert rows["whole"] == rows["split"]  # losses of every step (data position), evaluations
    assert [r["step"] for r in rows["whole"] if "loss" in r and "split" not in r] == list(range(10))
    assert all(r["num_devices"] == 1 for r in rows["whole"])
    assert [r["step"] for r in rows["whole"] if r.get("split") == "test"] == [6, 10]
    _, state_whole = _state(runs["whole"])
    _, state_split = _state(runs["split"])
    for a, b in zip(jax.tree.leaves(state_whole), jax.tree.leaves(state_split), strict=True):
        np.testing.assert_array_equal(a, b)  # params, BatchNorm statistics, momentum, GFI sums
    assert int(state_whole.aux.num_steps) == 10


def test_train_step_compiles_once_per_run(runs):
    # The three runs have the same architecture and settings: one step, compiled once.
    assert len(runs["steps_built"]) == 1
    assert runs["steps_built"][0]._cache_size() == 1


@pytest.fixture
def trained(runs, tmp_path):
    """A private copy of the uninterrupted run's workdir."""
    workdir = tmp_path / "run"
    shutil.copytree(runs["whole"], workdir)
    return workdir


def _some_file(step_dir: Path) -> Path:
    """The largest array file of a checkpoint."""
    return max(
        (p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )


@pytest.mark.parametrize("damage", ["garble", "truncate", "delete"])
def test_corrupt_checkpoint_is_refused_with_the_workdir_unchanged(trained, damage):
    target = _some_file(checkpoint.step_path(trained, 10))
    if damage == "garble":
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        target.write_bytes(bytes(raw))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    else:
        target.unlink()
    before = _snapshot(trained)
    with pytest.raises(checkpoint.CheckpointError) as refused:
        pipeline.train(CONFIG, trained, progress=False, verbose=False)
    message = str(refused.value)
    assert "\n" not in message
    assert str(checkpoint.step_path(trained, 10)) in message and target.name in message
    assert "restore_step" in message  # the way to choose an older step, never taken silently
    with pytest.raises(checkpoint.CheckpointError):
        pipeline.evaluate(trained)
    assert _snapshot(trained) == before
    # An older step, chosen explicitly, is still usable.
    assert pipeline.evaluate(trained, restore_step=8)["step"] == 8


def test_resuming_from_an_explicit_older_step_sets_the_later_ones_aside(trained):
    pipeline.train(CONFIG, trained, restore_step=6, stop_at=8, progress=False, verbose=False)
    assert checkpoint.steps(trained) == [6, 8]
    assert sorted(p.name for p in (trained / checkpoint.REJECTED_DIR).iterdir()) == ["10", "8"]


def test_an_interrupted_save_leaves_only_readable_checkpoints(trained):
    # Orbax writes into a temporary directory and renames it when complete; a crash leaves this.
    partial = checkpoint.checkpoint_root(trained) / "12.orbax-checkpoint-tmp-1700000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\0" * 10)
    assert checkpoint.steps(trained) == [6, 8, 10]
    assert pipeline.evaluate(trained)["step"] == 10


def test_an_existing_step_is_never_overwritten(trained):
    before = _snapshot(checkpoint.step_path(trained, 10))
    arch, state = _state(trained)
    with checkpoint.Writer(trained) as writer, pytest.raises(Exception, match="10"):
        writer.save(10, state, {"arch": arch.to_dict()})
    assert _snapshot(checkpoint.step_path(trained, 10)) == before


def test_pruned_checkpoint_restores_alone_and_evaluates_the_same(trained, tmp_path):
    arch, state = _state(trained)
    keep = {g: np.arange(0, n, 2) for g, n in jp.groups(arch).items()}  # every other channel
    out = tmp_path / "pruned"
    record = pipeline.prune_to(trained, out, keep, verbose=False)
    assert record["widths_after"] == {g: n // 2 for g, n in jp.groups(arch).items()}
    assert record["macs_after"] < record["macs_before"]
    # Nothing but the workdir: architecture from its JSON, shapes from eval_shape.
    pruned_arch, pruned_state = _state(out)
    assert jp.groups(pruned_arch) == record["widths_after"]
    expected_arch, expected_variables = jp.prune(arch, state.variables, keep)
    assert pruned_arch == expected_arch
    for a, b in zip(
        jax.tree.leaves(pruned_state.variables), jax.tree.leaves(expected_variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # The optimizer state is sliced (momentum kept), not reset.
    momentum = pruned_state.opt_state[0].trace
    expected_momentum = jp.prune_like(arch, state.opt_state, keep)[0].trace
    for a, b in zip(jax.tree.leaves(momentum), jax.tree.leaves(expected_momentum), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(np.asarray(m) != 0) for m in jax.tree.leaves(momentum))
    evaluated = pipeline.evaluate(out)
    assert evaluated["accuracy"] == record["accuracy_after"]
    assert evaluated["macs"] == record["macs_after"] == jp.count_macs(pruned_arch)


def test_a_step_without_its_manifest_is_refused_not_loaded_unverified(trained):
    step_dir = checkpoint.step_path(trained, 10)
    (step_dir / checkpoint.MANIFEST).unlink()
    target = _some_file(step_dir)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # undetectable without the manifest
    target.write_bytes(bytes(raw))
    before = _snapshot(trained)
    for attempt in (
        lambda: pipeline.evaluate(trained),
        lambda: pipeline.train(CONFIG, trained, progress=False, verbose=False),
    ):
        with pytest.raises(checkpoint.CheckpointError) as refused:
            attempt()
        message = str(refused.value)
        assert f"corrupt checkpoint {step_dir}: its checksum manifest" in message
        assert "restore_step: 8" in message and "\n" not in message
    assert _snapshot(trained) == before


def test_the_corrupt_checkpoint_hint_names_only_a_step_that_verifies(trained):
    for step in (10, 8):
        target = _some_file(checkpoint.step_path(trained, step))
        target.write_bytes(target.read_bytes()[:-7])
    with pytest.raises(checkpoint.CheckpointError) as refused:
        pipeline.evaluate(trained)
    assert str(refused.value).endswith("restore_step: 6)")  # not 8, itself corrupt
    assert pipeline.evaluate(trained, restore_step=6)["step"] == 6


def test_a_checkpoint_written_before_train_state_aux_was_named_restores(trained, tmp_path):
    """Workdirs saved when `TrainState.aux` was called ``gfi`` still restore, to the same values."""
    from jaxprune.train.step import legacy_target

    _, state = _state(trained)
    meta = checkpoint.read_meta(trained, 10)
    old = tmp_path / "old"
    with checkpoint.Writer(old) as writer:
        writer.save(10, legacy_target(state), {k: v for k, v in meta.items() if k != "format"})
    before, after = pipeline.evaluate(trained), pipeline.evaluate(old)
    assert after["accuracy"] == before["accuracy"] and after["loss"] == before["loss"]
