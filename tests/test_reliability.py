"""Workdirs that cannot be mixed or silently corrupted: the lock, divergence, bad inputs refused.

Each test pins one way a workdir could be mixed up or corrupted; the checksum-manifest and hint
cases live in test_checkpoint.py, the fine-tuning flags in test_cli.py.
"""

import gzip
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_cli as run

from jaxprune import checkpoint, cli, pipeline
from jaxprune import workdir as workdirs
from jaxprune.train import LoopOptions, MetricsLog, TrainingDiverged, TrainState, train_loop

SMALL = ["--model", "lenet5", "--data", "synthetic", "--synthetic-shape", "16,16,1"]
SMALL += ["--batch-size", "32"]  # 512 synthetic training examples: 16 steps per epoch


def command(*argv) -> list[str]:
    """``jaxprune ARGV`` as a separate process (``python -m``: no re-execution under tcmalloc)."""
    return [sys.executable, "-m", "jaxprune.cli", *map(str, argv)]


def snapshot(directory: Path) -> dict[str, str]:
    """Every path under ``directory`` -> sha256 of its bytes ('dir' for directories)."""
    return {
        str(p.relative_to(directory)): "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
    }


def one_line_error(code: int, err: str, text: str) -> None:
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert text in err and "Traceback" not in err, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """LeNet-5 trained 6 steps on synthetic 16x16x1 data, checkpoints at 3 and 6."""
    path = tmp_path_factory.mktemp("reliability") / "lenet"
    cli.main(["train", *SMALL, "--steps", "6", "--checkpoint-every", "3", "--workdir", str(path)])
    return path


# ---------------------------------------------------------------- 1. one writer per workdir


def _wait_until_locked(workdir: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while workdirs.writer_pid(workdir) != process.pid:
        if process.poll() is not None:
            raise AssertionError(f"the first run ended early: {process.communicate()}")
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)


@pytest.mark.slow  # four processes start JAX
def test_two_processes_racing_for_one_workdir(tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.Popen(
        command("train", *SMALL, "--steps", "12", "--checkpoint-every", "4", "--workdir", workdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_until_locked(workdir, first)
        # Frozen while it holds the lock, so that the workdir cannot change but by the others.
        os.kill(first.pid, signal.SIGSTOP)
        before = snapshot(workdir)
        others = {
            "train": ["train", *SMALL, "--steps", "12", "--seed", "1", "--workdir", workdir],
            "finetune": ["finetune", "--workdir", workdir, "--steps", "2"],
            "prune": ["prune", "--workdir", workdir, "--method", "l1", "--macs-ratio", "0.5",
                      "--out", workdir],
        }  # fmt: skip
        for name, argv in others.items():
            second = subprocess.run(command(*argv), capture_output=True, text=True, timeout=300)
            text = f"{workdir} is in use by process {first.pid}"
            assert second.returncode == 1, (name, second.stderr)
            assert second.stderr.strip().splitlines() == [
                f"jaxprune {name}: error: {text} (it holds {workdir / workdirs.LOCK_FILE}); wait "
                "for it to finish or use another workdir"
            ]
        assert snapshot(workdir) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    rows = MetricsLog(workdir / "metrics.jsonl").read()
    assert [r["step"] for r in rows if "learning_rate" in r] == list(range(12))  # one run's rows
    assert checkpoint.steps(workdir) == [4, 8, 12]
    assert workdirs.writer_pid(workdir) is None


@pytest.mark.slow  # a fresh process starts JAX and is killed
def test_kill_9_releases_the_lock(tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.Popen(
        command("train", *SMALL, "--steps", "100000", "--workdir", workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_locked(workdir, first)
    finally:
        first.kill()
        first.wait()
    assert (workdir / workdirs.LOCK_FILE).read_text().strip() == str(first.pid)  # stale file
    assert workdirs.writer_pid(workdir) is None
    with workdirs.owned(workdir):  # the kernel dropped the dead process's lock
        assert workdirs.writer_pid(workdir) == os.getpid()
        assert (workdir / workdirs.LOCK_FILE).read_text().strip() == str(os.getpid())


def _hold_lock(workdir: Path) -> subprocess.Popen:
    """Another process holding ``workdir``'s lock (as a writer between two saves would)."""
    code = (
        "import sys, time\n"
        "from jaxprune import workdir\n"
        "with workdir.owned(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(300)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(workdir)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow  # a second process writes the workdir while this one evaluates it
def test_eval_reads_the_last_finished_step_of_a_workdir_being_written(trained, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(trained, workdir)
    # The instant between orbax's commit of step 6 and its manifest.
    (checkpoint.step_path(workdir, 6) / checkpoint.MANIFEST).unlink()
    holder = _hold_lock(workdir)
    try:
        assert pipeline.evaluate(workdir)["step"] == 3
    finally:
        holder.kill()
        holder.wait()
    # With no writer, the step without a manifest is refused, never read unverified.
    with pytest.raises(checkpoint.CheckpointError, match="manifest"):
        pipeline.evaluate(workdir)


@pytest.mark.slow
def test_eval_reads_the_newest_step_again_when_a_writer_deletes_the_one_it_read(
    trained, tmp_path, monkeypatch
):
    from jaxprune.pipeline import loading

    workdir = tmp_path / "copy"
    shutil.copytree(trained, workdir)
    real = loading.load_run

    def writer_deletes_step_6_first(*args, **kwargs):
        monkeypatch.setattr(loading, "load_run", real)
        shutil.move(checkpoint.step_path(workdir, 6), tmp_path / "6")  # as --keep-checkpoints does
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "load_run", writer_deletes_step_6_first)
    assert pipeline.evaluate(workdir)["step"] == 3


def test_lock_within_one_process_is_reentrant_and_a_refused_run_leaves_nothing(tmp_path):
    workdir = tmp_path / "new" / "run"
    with workdirs.owned(workdir), workdirs.owned(workdir):
        assert workdirs.writer_pid(workdir) == os.getpid()
    assert not (tmp_path / "new").exists()  # created for nothing: removed again


# ---------------------------------------------------------------- 5. divergence


def _fake_step(bad_step: int, metric: str):
    """A train step whose metrics at ``bad_step`` have ``metric`` not finite."""

    def step(state, images, labels):
        bad = int(state.step) == bad_step
        metrics = {
            "loss": jnp.float32(1.0),
            "accuracy": jnp.float32(0.5),
            "learning_rate": jnp.float32(0.1),
            "grad_norm": jnp.float32(math.inf if bad and metric == "grad_norm" else 2.0),
            "finite": jnp.bool_(not (bad and metric == "finite")),
        }
        return state.replace(step=state.step + 1), metrics

    return step


@pytest.mark.parametrize(
    "metric, message",
    [
        ("grad_norm", "gradient norm is inf at step 3"),
        ("finite", "non-finite parameters after step 3"),
    ],
)
def test_a_finite_loss_with_an_infinite_gradient_or_parameters_stops_the_run(
    tmp_path, metric, message
):
    state = TrainState(jnp.int32(0), {"w": jnp.ones(2)}, {}, ())
    saved = []
    batches = iter([(jnp.zeros(1), jnp.zeros(1))] * 10)
    options = LoopOptions(end_step=10, steps_per_epoch=10, checkpoint_every=2, log_every=1)
    with pytest.raises(TrainingDiverged, match=message) as stopped:
        train_loop(
            state,
            _fake_step(3, metric),
            batches,
            options,
            log=MetricsLog(tmp_path / "metrics.jsonl"),
            save=lambda s: saved.append(int(s.step)),
        )
    assert saved == [2] and "last good checkpoint is step 2" in str(stopped.value)


@pytest.mark.parametrize("lr", ["30", pytest.param("1e3", marks=pytest.mark.slow)])
def test_a_diverging_run_names_a_checkpoint_that_evaluates_finite(tmp_path, capsys, lr):
    workdir = tmp_path / "div"
    argv = ["train", *SMALL, "--steps", "32", "--checkpoint-every", "1", "--keep-checkpoints"]
    argv += ["100", "--lr", lr, "--warmup-steps", "0", "--workdir", workdir]
    code, _, err = run(argv, capsys)
    one_line_error(code, err, "training stopped")
    assert "is nan" in err or "is inf" in err or "non-finite" in err
    losses = {
        s: pipeline.evaluate(workdir, restore_step=s)["loss"] for s in checkpoint.steps(workdir)
    }
    good = [s for s, loss in losses.items() if math.isfinite(loss)]
    if good:  # the newest checkpoint that evaluates finite is the one named
        assert f"the last good checkpoint is step {max(good)} " in err
    else:
        assert "no checkpoint" in err and "evaluates to a finite test loss" in err


# ---------------------------------------------------------------- 6. and 7. bad data


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _idx_dir(root: Path, labels_high: int = 10, test_size: int = 28) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count, size in (("train", 64, 28), ("t10k", 32, test_size)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, size, 28)))
        labels = rng.integers(0, 10, count)
        labels[::2] = labels_high - 1 if labels_high > 10 else labels[::2]
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def _train_on(data_dir: Path, workdir: Path) -> list:
    return ["train", "--model", "lenet5", "--data", "mnist", "--data-dir", data_dir,
            "--batch-size", "16", "--steps", "2", "--workdir", workdir]  # fmt: skip


def test_labels_out_of_range_are_refused_naming_the_file(tmp_path, capsys):
    data_dir = _idx_dir(tmp_path / "data", labels_high=201)
    code, _, err = run(_train_on(data_dir, tmp_path / "w"), capsys)
    one_line_error(code, err, str(data_dir / "train-labels-idx1-ubyte.gz"))
    assert "outside [0, 10)" in err
    assert not (tmp_path / "w").exists()


def test_images_of_another_shape_are_refused(tmp_path, capsys):
    data_dir = _idx_dir(tmp_path / "data", test_size=27)
    code, _, err = run(_train_on(data_dir, tmp_path / "w"), capsys)
    one_line_error(code, err, f"the test images in {data_dir} are uint8[32, 27, 28, 1]")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_a_broken_gzip_file_is_refused_naming_it(tmp_path, capsys, damage):
    data_dir = _idx_dir(tmp_path / "data")
    victim = data_dir / "train-images-idx3-ubyte.gz"
    raw = victim.read_bytes()
    victim.write_bytes(
        np.random.default_rng(0).bytes(len(raw))
        if damage == "random bytes"
        else raw[: len(raw) // 2]
    )
    code, _, err = run(_train_on(data_dir, tmp_path / "w"), capsys)
    one_line_error(code, err, f"{victim} is not a complete gzip file")
    assert not (tmp_path / "w").exists()


def test_images_too_small_for_the_model_are_refused(tmp_path, capsys):
    argv = ["train", "--model", "lenet5", "--data", "synthetic", "--synthetic-shape", "5,5,1"]
    code, _, err = run([*argv, "--steps", "2", "--workdir", tmp_path / "w"], capsys)
    one_line_error(code, err, "lenet5 cannot take 5x5x1 images")
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- 7. workdirs that cannot be


def test_a_workdir_that_is_a_file_or_under_one_is_refused(trained, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    train = ["train", *SMALL, "--steps", "2", "--workdir"]
    prune = ["prune", "--workdir", trained, "--method", "l1", "--macs-ratio", "0.5", "--out"]
    for argv, text in (
        ([*train, a_file], f"cannot use {a_file} as a workdir: it is a file"),
        ([*train, a_file / "sub"], f"it lies under the file {a_file}"),
        ([*prune, a_file], f"cannot use {a_file} as a workdir: it is a file"),
        ([*prune, a_file / "sub" / "deeper"], f"it lies under the file {a_file}"),
    ):
        code, _, err = run(argv, capsys)
        one_line_error(code, err, text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    assert a_file.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_workdir_in_a_read_only_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, err = run(["train", *SMALL, "--steps", "2", "--workdir", folder / "w"], capsys)
        one_line_error(code, err, f"{folder} is not writable")
    finally:
        folder.chmod(0o755)
    assert not any(folder.iterdir())


def test_eval_prints_its_result_when_metrics_cannot_be_appended(trained, tmp_path, capsys):
    workdir = tmp_path / "copy"
    shutil.copytree(trained, workdir)
    # What a read-only workdir does to the append (tests run as root, who may write anywhere).
    (workdir / "metrics.jsonl").unlink()
    (workdir / "metrics.jsonl").mkdir()
    before = snapshot(workdir)
    code, out, err = run(["eval", "--workdir", workdir, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["step"] == 6
    assert len(err.strip().splitlines()) == 1 and "warning" in err and "metrics.jsonl" in err
    assert snapshot(workdir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_eval_of_a_read_only_workdir(trained, tmp_path, capsys):
    workdir = tmp_path / "copy"
    shutil.copytree(trained, workdir)
    paths = [workdir, *workdir.rglob("*")]
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        code, out, err = run(["eval", "--workdir", workdir, "--json"], capsys)
    finally:
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert code == 0, err
    assert json.loads(out)["step"] == 6


def _can_mount_read_only() -> bool:
    probe = "mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp"
    try:
        done = subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.slow  # trains and evaluates in a fresh process under a read-only mount
@pytest.mark.skipif(not _can_mount_read_only(), reason="needs unshare -m and mount (root)")
def test_eval_and_train_on_a_read_only_file_system(trained, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(trained, workdir)
    before = snapshot(workdir)
    script = (
        f"mount --bind {tmp_path} {tmp_path} && mount -o remount,bind,ro {tmp_path} && "
        f"{' '.join(command('eval', '--workdir', workdir, '--json'))}; echo status $?; "
        f"{' '.join(command('train', *SMALL, '--steps', '6', '--workdir', workdir))}; "
        "echo status $?"
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300
    )
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[0])["step"] == 6 and lines[1:] == ["status 0", "status 1"], done
    errors = done.stderr.strip().splitlines()
    assert errors[0].startswith("jaxprune: warning: the result was not appended to"), errors
    assert errors[1:] == [
        f"jaxprune train: error: cannot use {workdir} as a workdir: {workdir} is not writable"
    ]
    assert snapshot(workdir) == before


# ---------------------------------------------------------------- 8. smaller


def test_a_torn_last_line_is_skipped_and_not_glued_to_the_next_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write({"step": 0, "loss": 1.0})
    with path.open("a") as f:
        f.write('{"step": 1, "lo')  # a crash in the middle of a row
    assert log.read() == [{"step": 0, "loss": 1.0}]
    log.write({"step": 1, "loss": 0.5})
    assert log.read() == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}]
    assert path.read_text().splitlines()[1] == '{"step": 1, "lo'


def test_prune_into_a_folder_that_is_not_a_workdir_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"meow")
    argv = ["prune", "--workdir", trained, "--method", "l1", "--macs-ratio", "0.5", "--out", out]
    code, _, err = run(argv, capsys)
    one_line_error(code, err, f"{out} is not empty and is not a jaxprune workdir")
    assert sorted(p.name for p in out.iterdir()) == ["cat.jpg"]


@pytest.mark.slow  # trains, stops and resumes a run
def test_the_epoch_summary_after_a_resume_says_which_steps_it_covers(tmp_path, capsys):
    argv = ["train", *SMALL, "--steps", "16", "--workdir", tmp_path / "w"]
    code, out, err = run([*argv, "--stop-at", "10"], capsys)
    assert code == 0, err
    code, out, err = run(argv, capsys)
    assert code == 0, err
    summary = next(line for line in out.splitlines() if line.startswith("epoch 1/1"))
    assert "(of steps 10-15 only: resumed)" in summary
    code, out, err = run(["train", *SMALL, "--steps", "16", "--workdir", tmp_path / "x"], capsys)
    assert "resumed" not in next(line for line in out.splitlines() if line.startswith("epoch"))
