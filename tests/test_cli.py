"""The `jaxprune` command: the pipeline end to end, and one readable line for every user error."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import run_cli as run

from jaxprune import checkpoint, cli, models, pipeline
from jaxprune.pipeline import inputs, loading, run_loop
from jaxprune.train import MetricsLog

TRAIN = ["--data", "synthetic", "--synthetic-shape", "16,16,1", "--batch-size", "32"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """LeNet-5 trained 6 steps on synthetic 16x16x1 data, checkpoints at 3 and 6."""
    path = tmp_path_factory.mktemp("cli") / "lenet"
    argv = ["train", "--model", "lenet5", *TRAIN, "--steps", "6", "--checkpoint-every", "3"]
    cli.main([*argv, "--workdir", str(path)])
    return path


def test_train_prune_finetune_eval(workdir, tmp_path, capsys):
    rows = MetricsLog(workdir / "metrics.jsonl").read()
    assert [r["step"] for r in rows if "loss" in r and "split" not in r] == list(range(6))
    assert rows[-1]["split"] == "test" and 0 <= rows[-1]["accuracy"] <= 1

    pruned = tmp_path / "pruned"
    code, out, _ = run(
        [
            "prune",
            "--workdir",
            workdir,
            "--method",
            "l1",
            "--filters-ratio",
            "0.5",
            "--out",
            pruned,
        ],
        capsys,
    )
    assert code == 0 and "pruned lenet5" in out
    record = json.loads((pruned / "prune.json").read_text())
    assert record["widths_before"] == {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}
    assert sum(record["widths_after"].values()) <= 0.5 * sum(record["widths_before"].values())
    assert record["macs_after"] < record["macs_before"]
    assert record["params_after"] < record["params_before"]
    assert {"accuracy_before", "accuracy_after"} <= set(record)
    assert MetricsLog(pruned / "metrics.jsonl").read()[0]["macs_after"] == record["macs_after"]

    code, out, _ = run(["finetune", "--workdir", pruned, "--steps", "4", "--lr", "0.01"], capsys)
    assert code == 0 and "done: step 4" in out
    code, out, _ = run(["eval", "--workdir", pruned, "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["step"] == 4 and result["phase"] == "finetune"
    assert result["macs"] == record["macs_after"]
    rows = MetricsLog(pruned / "metrics.jsonl").read()
    assert [r["step"] for r in rows if "learning_rate" in r] == list(range(4))
    assert rows[-1] == {k: result[k] for k in ("step", "accuracy", "loss", "split", "num_devices")}


def _errors(workdir: Path, tmp: Path) -> dict[str, tuple[list, int, str]]:
    """name -> (argv, exit status, text the one line must contain)."""
    empty = tmp / "empty"
    empty.mkdir()
    fresh = str(tmp / "fresh")
    lenet = ["--model", "lenet5", *TRAIN, "--steps", "2"]
    prune = ["prune", "--workdir", workdir, "--method", "l1", "--out", tmp / "out"]
    return {
        "unknown model": (["train", "--model", "nope", *TRAIN, "--steps", "2", "--workdir", fresh],
                          1, "unknown model 'nope'; valid models: lenet5, vgg11"),
        "unknown data": (["train", "--model", "lenet5", "--data", "nope", "--steps", "2",
                          "--workdir", fresh], 1, "valid names are: fashion_mnist, mnist"),
        "missing data": (["train", "--model", "lenet5", "--data", "mnist", "--data-dir", empty,
                          "--steps", "2", "--workdir", fresh], 1, "No mnist data found"),
        "unknown method": (["prune", "--workdir", workdir, "--method", "nope", "--macs-ratio",
                            "0.5", "--out", tmp / "out"], 1,
                           "valid methods: gfi, gfi_ap_authors, taylor_fo_bn"),
        "impossible budget": ([*prune, "--macs-ratio", "0.001"], 1, "budget 0.001 is impossible"),
        "unknown policy": ([*prune, "--macs-ratio", "0.5", "--policy", "greedy"], 1,
                           "unknown policy 'greedy'; valid policies: adaptive, uniform"),
        "ratio above one": ([*prune, "--params-ratio", "1.5"], 1,
                            "fraction kept and must lie in (0, 1]"),
        "two budgets": ([*prune, "--macs-ratio", "0.5", "--params-ratio", "0.5"], 2,
                        "not allowed with argument"),
        "missing option": (["train", "--model", "lenet5", "--steps", "2"], 2,
                           "the following arguments are required: --workdir"),
        "other settings": (["train", *lenet[:-1], "6", "--workdir", workdir, "--seed", "1"], 1,
                           "holds a run with other settings (seed)"),
        "batch too large": (["train", "--model", "lenet5", *TRAIN[:-1], "1024", "--steps", "2",
                             "--workdir", fresh], 1, "exceeds the 512 training examples"),
        "no checkpoint": (["eval", "--workdir", empty], 1, "no checkpoint in"),
        "finetune unpruned": (["finetune", "--workdir", workdir, "--steps", "2"], 1,
                              "unpruned training run"),
        "out in use": ([*prune[:-1], workdir, "--macs-ratio", "0.5"], 1, "already holds"),
        "missing step": (["eval", "--workdir", workdir, "--restore-step", "4"], 1,
                         "no checkpoint at step 4"),
    }  # fmt: skip


ERROR_NAMES = [
    "unknown model", "unknown data", "missing data", "unknown method", "impossible budget",
    "unknown policy",
    "ratio above one", "two budgets", "missing option", "other settings", "batch too large",
    "no checkpoint", "finetune unpruned", "out in use", "missing step",
]  # fmt: skip


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_user_errors_exit_with_one_line(workdir, tmp_path, capsys, name):
    argv, status, text = _errors(workdir, tmp_path)[name]
    before = sorted(p.name for p in workdir.rglob("*"))
    code, out, err = run(argv, capsys)
    assert code == status, err
    assert len(err.strip().splitlines()) == 1, err
    assert text in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in workdir.rglob("*")) == before


def test_corrupt_checkpoint_exits_with_one_line_naming_it(workdir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    victim = next(p for p in (checkpoint.step_path(copy, 6) / "state").rglob("*") if p.is_file())
    victim.write_bytes(victim.read_bytes()[:-1])
    code, _, err = run(["eval", "--workdir", copy], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"corrupt checkpoint {checkpoint.step_path(copy, 6)}" in err
    assert "--restore-step: 3" in err


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real = run_loop.global_batches

    def poisoned(dataset, mesh, config, start_step):
        for step, (images, labels) in enumerate(
            real(dataset, mesh, config, start_step), start_step
        ):
            yield (images * np.nan if step >= 4 else images), labels

    monkeypatch.setattr(run_loop, "global_batches", poisoned)
    workdir = tmp_path / "nan"
    argv = ["train", "--model", "lenet5", *TRAIN, "--steps", "8", "--checkpoint-every", "3"]
    code, _, err = run([*argv, "--workdir", workdir], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "loss is nan at step 4" in err and "last good checkpoint is step 3" in err
    assert checkpoint.steps(workdir) == [3]
    rows = MetricsLog(workdir / "metrics.jsonl").read()
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and rows[-1]["loss"] is None


@pytest.mark.slow  # test_reliability's diverging runs cover this in the fast tier
def test_diverging_learning_rate_is_stopped(tmp_path, capsys):
    argv = ["train", "--model", "lenet5", *TRAIN, "--steps", "6", "--lr", "1e9"]
    code, _, err = run([*argv, "--warmup-steps", "0", "--workdir", tmp_path / "div"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "training stopped" in err


def _script() -> str:
    found = shutil.which("jaxprune") or str(Path(sys.executable).with_name("jaxprune"))
    assert Path(found).exists(), "the jaxprune console script is not installed"
    return found


@pytest.mark.slow
def test_console_script(workdir, tmp_path):
    bad = subprocess.run(
        [_script(), "train", "--model", "resnet7", "--steps", "1", "--workdir", tmp_path / "x"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"jaxprune train: error: unknown model 'resnet7'; valid models: {', '.join(models.names())}"
    ]
    good = subprocess.run(
        [_script(), "eval", "--workdir", workdir, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["step"] == 6


@pytest.mark.parametrize(
    "environ, want",
    [
        ({}, "libtcmalloc_minimal.so.4"),
        ({"LD_PRELOAD": "/opt/libfoo.so"}, "libtcmalloc_minimal.so.4:/opt/libfoo.so"),
        ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, None),  # already under tcmalloc
        ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, None),  # the re-executed process
        ({cli.ALLOCATOR_ENV: "system"}, None),
    ],
)
def test_console_script_preloads_tcmalloc_once(environ, want):
    got = cli.preload_environ(environ, "libtcmalloc_minimal.so.4")
    assert (got and got["LD_PRELOAD"]) == want
    assert cli.preload_environ(environ, None) is None  # not installed: run as is


@pytest.mark.slow  # a fresh process
def test_console_script_with_the_system_allocator(workdir):
    env = {**os.environ, cli.ALLOCATOR_ENV: "system"}
    done = subprocess.run(
        [_script(), "eval", "--workdir", workdir, "--json"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["step"] == 6


def test_finetune_honours_checkpoint_every_and_keep_checkpoints(workdir, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    argv = ["prune", "--workdir", workdir, "--method", "l1", "--filters-ratio", "0.5", "--no-eval",
            "--out", pruned]  # fmt: skip
    assert run(argv, capsys)[0] == 0
    argv = ["finetune", "--workdir", pruned, "--steps", "5", "--checkpoint-every", "2"]
    code, _, err = run([*argv, "--keep-checkpoints", "2", "--stop-at", "3"], capsys)
    assert code == 0, err
    assert checkpoint.steps(pruned) == [2, 3]  # a crash at step 3 would lose one step, not three
    code, _, err = run(["finetune", "--workdir", pruned, "--keep-checkpoints", "4"], capsys)
    assert code == 0, err
    assert checkpoint.steps(pruned) == [2, 3, 4, 5]  # resumed with the saved --checkpoint-every


def test_finetune_fresh_optimizer_drops_only_the_sliced_momentum(workdir, tmp_path, capsys):
    """One SGD step without weight decay or Nesterov at a constant rate is p - lr (mu m + g):
    starting from zero momentum moves every parameter by lr mu m0 (m0: the sliced momentum) more
    than carrying it does, and changes nothing else."""
    pruned = tmp_path / "pruned"
    argv = ["prune", "--workdir", workdir, "--method", "l1", "--filters-ratio", "0.5", "--no-eval",
            "--out", pruned]  # fmt: skip
    assert run(argv, capsys)[0] == 0
    lr, momentum = 0.01, 0.9
    sgd = ["--steps", "1", "--lr", str(lr), "--momentum", str(momentum), "--schedule", "constant",
           "--warmup-steps", "0", "--weight-decay", "0", "--no-nesterov"]  # fmt: skip
    params = {}
    for name, extra in {"carried": [], "fresh": ["--fresh-optimizer"]}.items():
        shutil.copytree(pruned, tmp_path / name)
        code, _, err = run(["finetune", "--workdir", tmp_path / name, *sgd, *extra], capsys)
        assert code == 0, err
        params[name] = pipeline.load(tmp_path / name)[1]["params"]
    step = loading.pick_step(pruned, None)
    mesh = inputs.data_mesh(jax.devices()[:1], 1)
    _, state = loading.restore(pruned, step, loading.read_meta(pruned, step), mesh)
    sliced_momentum = state.opt_state[0].trace
    assert max(float(np.abs(m).max()) for m in jax.tree.leaves(sliced_momentum)) > 0

    def check(fresh, carried, m0, p0):
        # Each run rounds p0 - lr * (...) once: a few float32 ulps of |p0| apart at most.
        atol = (
            4 * np.finfo(np.float32).eps * (float(np.abs(p0).max()) + lr * float(np.abs(m0).max()))
        )
        np.testing.assert_allclose(
            fresh - carried, lr * momentum * np.asarray(m0), rtol=0, atol=atol
        )

    jax.tree.map(check, params["fresh"], params["carried"], sliced_momentum, state.params)


@pytest.mark.slow  # three CLI runs
def test_augmentation_recorded_and_off_for_finetuning_unless_asked(workdir, tmp_path, capsys):
    base = tmp_path / "base"
    argv = ["train", "--model", "lenet5", *TRAIN, "--steps", "2", "--no-augment"]
    assert run([*argv, "--workdir", base], capsys)[0] == 0
    assert loading.read_meta(base, 2)["config"]["augment"] is False
    old = {k: v for k, v in loading.read_meta(base, 2)["config"].items() if k != "augment"}
    assert pipeline.TrainConfig.from_dict(old).augment  # metas written before the field

    assert loading.read_meta(workdir, 6)["config"]["augment"] is True  # the training default
    pruned = tmp_path / "pruned"
    argv = ["prune", "--workdir", workdir, "--method", "l1", "--filters-ratio", "0.5", "--no-eval",
            "--out", pruned]  # fmt: skip
    assert run(argv, capsys)[0] == 0
    for name, flags, augmented in [("plain", [], False), ("augmented", ["--augment"], True)]:
        shutil.copytree(pruned, tmp_path / name)
        argv = ["finetune", "--workdir", tmp_path / name, "--steps", "2", "--stop-at", "1"]
        assert run([*argv, *flags], capsys)[0] == 0
        assert loading.read_meta(tmp_path / name, 1)["config"]["augment"] is augmented
        # resuming without the flag keeps the run's own setting
        assert run(["finetune", "--workdir", tmp_path / name], capsys)[0] == 0
        assert loading.read_meta(tmp_path / name, 2)["config"]["augment"] is augmented


def test_prune_uniform_policy_keeps_the_same_fraction_everywhere(workdir, tmp_path, capsys):
    out = tmp_path / "uniform"
    argv = ["prune", "--workdir", workdir, "--method", "l1", "--policy", "uniform",
            "--macs-ratio", "0.5", "--no-eval", "--out", out]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 0, err
    record = json.loads((out / "prune.json").read_text())
    assert record["policy"] == "uniform"
    assert record["macs_after"] <= 0.5 * record["macs_before"]
    fractions = [record["widths_after"][g] / n for g, n in record["widths_before"].items()]
    assert max(fractions) - min(fractions) <= 1 / 6 + 1e-9  # conv1 has 6 channels
