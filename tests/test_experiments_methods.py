"""The small (``--tiny``) versions of experiments 2a 2b, 2f (recovery), and the 2e config scripts.

The scripts live outside the package, so they are imported from their files and run in-process
through ``main(argv)``; the JSON they write is checked for structure and sanity.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
CONFIGS = sorted((EXPERIMENTS / "configs").glob("*.sh"))
# Every config script with the arguments of each setting it runs: cifar10.sh takes the model.
CONFIG_RUNS = [
    *(("cifar10.sh", model) for model in ("resnet32", "resnet56", "vgg16")),
    ("imagenet_resnet50.sh",),
]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    return module


def in_unit_interval(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


@pytest.mark.slow
def test_compare_methods_tiny(tmp_path):
    script = load_script("compare_methods")
    out = tmp_path / "2a.json"
    returned = script.main(["--tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["summary"] == json.loads(json.dumps(returned["summary"]))
    assert {"settings", "machine", "date", "wall_s", "baselines", "runs"} <= set(result)
    ratios = result["settings"]["macs_ratios"]
    methods = result["settings"]["methods"]
    assert {"gfi", "l1_uniform"} <= set(methods)
    assert len(result["runs"]) == len(methods) * len(ratios)
    (baseline,) = result["baselines"]
    assert in_unit_interval(baseline["accuracy"])
    for name in methods:
        runs = sorted(
            (r for r in result["runs"] if r["method"] == name), key=lambda r: r["macs_ratio_target"]
        )
        assert [r["macs_ratio_target"] for r in runs] == sorted(ratios)
        macs = [r["macs"] for r in runs]
        assert macs == sorted(macs) and macs[-1] < baseline["macs"]  # fewer MACs kept, fewer MACs
        for r in runs:
            assert in_unit_interval(r["accuracy"])
            # The budget is met: at most the target, and not far below it.
            assert r["macs_ratio_target"] - 0.15 <= r["macs_ratio"] <= r["macs_ratio_target"] + 1e-9
            assert r["macs"] / baseline["macs"] == pytest.approx(r["macs_ratio"])
            assert all(w >= 1 for w in r["widths"].values())
    assert len(result["summary"]) == 1 + len(methods) * len(ratios)
    assert "gfi" in script.format_table(result["summary"])
    for r in result["runs"]:
        assert in_unit_interval(r["accuracy_at_cut"]) and in_unit_interval(
            r["accuracy_recalibrated"]
        )

    # --report pools the runs of several files (e.g. one process per seed) into one summary.
    other = json.loads(out.read_text())
    for row in (*other["baselines"], *other["runs"]):
        row["seed"] = 1
        row["accuracy"] = 1.0 - row["accuracy"]  # so the pooled std is not zero
    other_path = tmp_path / "2a_seed1.json"
    other_path.write_text(json.dumps(other))
    pooled = script.main(["--report", str(out), str(other_path)])
    assert len(pooled["baselines"]) == 2 and len(pooled["runs"]) == 2 * len(result["runs"])
    assert [s["num_seeds"] for s in pooled["summary"]] == [2] * len(result["summary"])
    for s in pooled["summary"]:
        assert s["accuracy_mean"] == pytest.approx(0.5)
    with pytest.raises(SystemExit) as refused:  # a script that reports one file at a time
        load_script("fsabp_lenet").main(["--report", str(out), str(other_path)])
    assert refused.value.code == 2


@pytest.mark.slow
def test_recovery_tiny(tmp_path):
    """2f: every (recipe, method, fine-tuning) row, from one cut per method and re-estimation."""
    out = tmp_path / "2f.json"
    script = load_script("recovery")
    script.main(["--tiny", "--workdir", str(tmp_path / "runs"), "--out", str(out)])
    result = json.loads(out.read_text())
    settings = result["settings"]
    expected = {
        (recipe, method, finetune)
        for recipe in settings["recipes"]
        for method in settings["methods"]
        for finetune in (settings["finetunes"] if recipe == "augmented" else ["unaugmented"])
    }
    assert {(r["recipe"], r["method"], r["finetune"]) for r in result["runs"]} == expected
    assert len(result["runs"]) == len(expected) and len(result["baselines"]) == 2
    for r in result["runs"]:
        assert in_unit_interval(r["accuracy"]) and 0.4 <= r["macs_ratio"] <= 0.5 + 1e-9
        assert r["loss_pt"] == pytest.approx(100 * (r["baseline"] - r["accuracy"]))
    runs = tmp_path / "runs" / "seed0" / "augmented"
    for finetune in settings["finetunes"]:  # each fine-tuned from its own copy of the cut
        assert (runs / f"gfi_{finetune}" / "checkpoints").is_dir()
    assert "| augmented | gfi | fresh_optimizer |" in script.markdown_table(result)


@pytest.mark.slow
@pytest.mark.parametrize("macs_ratio", [0.7, 0.4])
def test_compare_methods_every_method_meets_the_budget(macs_ratio):
    """Each method of 2a scores and selects (no training): widths within the MACs budget."""
    import jax
    import jax.numpy as jnp

    import jaxprune as jp
    from jaxprune import methods, select

    script = load_script("compare_methods")
    arch = jp.models.create("lenet5", 10, (28, 28, 1))
    variables = arch.module().init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False)
    images = jax.random.normal(jax.random.PRNGKey(1), (8, 28, 28, 1))
    batches = [(images, jnp.arange(8) % 10)]
    budget = select.Budget("macs", macs_ratio)
    for name, variant in script.VARIANTS.items():
        method = methods.get(variant.method)
        scores = method.score(arch, variables, batches if method.needs_data else None)
        assert {g: s.shape[0] for g, s in scores.items()} == jp.groups(arch), name
        prunable = variant.prunable or method.default_prunable(arch)
        if prunable == "authors":
            prunable = methods.authors_layers(arch)
        rules = select.WidthRules(max_pruning_ratio=variant.max_pruning_ratio, prunable=prunable)
        keep = method.select(arch, scores, budget, rules, variant.policy, variant.ranking)
        pruned, _ = jp.prune(arch, variables, keep)
        assert jp.count_macs(pruned) <= macs_ratio * jp.count_macs(arch) * (1 + 1e-9), name
        if variant.max_pruning_ratio is not None:  # no group below the cap
            for g, n in jp.groups(arch).items():
                assert len(keep[g]) >= (1 - variant.max_pruning_ratio) * n - 1e-9, (name, g)


@pytest.mark.slow
def test_fsabp_lenet_tiny(tmp_path):
    script = load_script("fsabp_lenet")
    out = tmp_path / "2b.json"
    script.main(["--tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    baseline = result["baseline"]
    assert in_unit_interval(baseline["accuracy"])
    assert in_unit_interval(baseline["heldout_accuracy"])
    (tolerance,) = result["settings"]["tolerances"]
    methods = [r["method"] for r in result["runs"]]
    assert methods == ["fsabp_backward", "fsabp_forward", "l1_uniform", "l1_adaptive"]
    by_method = {r["method"]: r for r in result["runs"]}
    for r in result["runs"]:
        assert r["tolerance"] == tolerance
        for key in ("heldout_accuracy", "test_accuracy_pruned", "test_accuracy_finetuned"):
            assert in_unit_interval(r[key])
        assert 0.0 <= r["params_removed"] < 1.0
        assert r["params"] == pytest.approx(baseline["params"] * (1 - r["params_removed"]))
    for name in ("fsabp_backward", "fsabp_forward"):
        r = by_method[name]
        # The procedure's own guarantee: held-out accuracy within the tolerance of the start.
        assert r["heldout_accuracy"] >= baseline["heldout_accuracy"] - tolerance - 1e-9
        assert [s["group"] for s in r["log"]] == (
            result["settings"]["groups"][::-1]
            if name == "fsabp_backward"
            else result["settings"]["groups"]
        )
    # L1 gets at most backward FSABP's parameter count.
    for name in ("l1_uniform", "l1_adaptive"):
        assert by_method[name]["params"] <= by_method["fsabp_backward"]["params"]
    assert "fsabp_backward" in script.format_table(result)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_script_parses(config):
    subprocess.run(["bash", "-n", str(config)], check=True)


def record_commands(run: tuple[str, ...], tmp_path: Path, **env: str) -> list[list[str]]:
    """Runs a config script with ``jaxprune`` replaced by a stub; the command lines it got."""
    calls = tmp_path / "calls"
    stub = tmp_path / "jaxprune"
    stub.write_text(
        f"#!/usr/bin/env bash\nprintf '%s\\037' \"$@\" >> {calls}\nprintf '\\036' >> {calls}\n"
    )
    stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "DATA_DIR": str(tmp_path / "data"),
        "RUNS": str(tmp_path / "runs"),
        "COORDINATOR": "localhost:1234",
        "NUM_PROCESSES": "2",
        "PROCESS_ID": "0",
        **env,
    }
    script, *args = run
    done = subprocess.run(
        ["bash", str(EXPERIMENTS / "configs" / script), *args],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return [c.split("\x1f")[:-1] for c in calls.read_text().split("\x1e")[:-1]]


@pytest.mark.parametrize("run", CONFIG_RUNS, ids=" ".join)
def test_config_script_flags_exist(run, tmp_path):
    """Runs the script with ``jaxprune`` replaced by a stub that records its command lines, then
    parses every recorded command line with the real CLI parser (unknown flags fail)."""
    from jaxprune.cli import build_parser

    commands = record_commands(run, tmp_path)
    assert [c[0] for c in commands][:3] == ["train", "prune", "finetune"]
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)  # exits (SystemExit) on an unknown or malformed flag


@pytest.mark.parametrize(
    ("model", "env", "weight_decay"),
    [
        ("resnet32", {}, "1e-4"),
        ("resnet56", {}, "1e-4"),
        ("vgg16", {}, "5e-4"),
        ("vgg16", {"WEIGHT_DECAY": "2e-4"}, "2e-4"),
    ],
)
def test_cifar10_config_trains_the_model_asked_for(model, env, weight_decay, tmp_path):
    """The model comes from the argument or MODEL=; its weight decay defaults per family."""
    for i, (args, model_env) in enumerate([((model,), {}), ((), {"MODEL": model})]):
        stub_dir = tmp_path / str(i)  # a stub (and its record of calls) per run
        stub_dir.mkdir()
        train = record_commands(("cifar10.sh", *args), stub_dir, **env, **model_env)[0]
        assert train[train.index("--model") + 1] == model
        assert train[train.index("--weight-decay") + 1] == weight_decay


def test_cifar10_config_refuses_an_unknown_model(tmp_path):
    done = subprocess.run(
        ["bash", str(EXPERIMENTS / "configs" / "cifar10.sh"), "resnet20"],
        env={**os.environ, "DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "unknown model resnet20" in done.stderr


def test_every_config_script_is_run():
    assert {p.name for p in CONFIGS} == {run[0] for run in CONFIG_RUNS}
