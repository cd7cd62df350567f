"""The small (``--tiny``) versions of experiments 2c (importance quality) and 2d (speed), and the
CPU kernels' A/B script (``ab_conv_source.py``) on one small shape.

They run in-process through each script's ``main(argv)`` and pin the structure and sanity of what
they write, so the full runs cannot silently break.
"""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import jaxprune as jp

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_script(name: str):
    sys.path.insert(0, str(EXPERIMENTS))  # importance_quality imports bench's `environment`
    try:
        spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXPERIMENTS))


def check_environment(env: dict) -> None:
    assert {"date", "backend", "jax_version", "jaxprune_conv_impl"} <= set(env)


@pytest.fixture(scope="module")
def importance_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("2c") / "2c.json"
    returned = load_script("importance_quality").main(["--tiny", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["criteria"].keys() == returned["criteria"].keys()
    return written


@pytest.mark.slow
def test_importance_quality_covers_every_criterion(importance_record):
    script = load_script("importance_quality")
    names = {name for name, _ in script.RUNS.values()}
    assert names == set(jp.importance.CRITERIA) - {"oracle"}
    assert set(importance_record["criteria"]) == set(script.RUNS)
    check_environment(importance_record["environment"])


@pytest.mark.slow  # trains the importance-quality baseline
def test_importance_quality_values_are_sane(importance_record):
    groups = importance_record["groups"]
    assert set(importance_record["oracle"]["scores"]) == set(groups)
    assert importance_record["oracle"]["cold_s"] > 0
    for label, r in importance_record["criteria"].items():
        assert r["cold_s"] > 0 and r["warm_s"] > 0, label
        for key in ("per_group_signed", "per_group_abs"):
            assert set(r[key]) == set(groups), (label, key)
        rhos = [
            r["pooled_signed"],
            r["pooled_abs"],
            r["pooled_normalized_signed"],
            r["pooled_normalized_abs"],
            *r["per_group_signed"].values(),
            *r["per_group_abs"].values(),
        ]
        for rho in rhos:
            assert rho is None or (-1.0 <= rho <= 1.0 and not math.isnan(rho)), (label, rho)
        assert r["pooled_signed"] is not None, label


@pytest.mark.slow
def test_bench_structure_and_speedups(tmp_path):
    out = tmp_path / "2d.json"
    # One family keeps the test short; the bottleneck ResNet has every kind of group (stem too).
    argv = ["--tiny", "--models", "resnet50", "--oracle-models", "resnet50", "--out", str(out)]
    load_script("bench").main(argv)
    record = json.loads(out.read_text())
    check_environment(record["environment"])
    model = record["models"]["resnet50"]
    assert set(model["variants"]) == {"original", "pruned_round1", "pruned_round8"}
    for label, v in model["variants"].items():
        for kind in ("train_step", "inference"):
            assert v[kind]["images_per_s"] > 0 and v[f"{kind}_speedup"] > 0, (label, kind)
            assert len(v[kind]["seconds"]) == record["repeats"]
        assert v["macs_speedup"] >= 1.0
    for label in ("pruned_round1", "pruned_round8"):
        ratio = model["variants"][label]["macs_ratio"]
        assert ratio <= record["macs_ratio_target"] + 1e-9, (label, ratio)
    for width in model["variants"]["pruned_round8"]["widths"].values():
        assert width % 8 == 0
    assert model["gfi_pass"]["per_train_step"] > 0
    assert model["oracle"]["seconds_one_call"] > 0
    assert model["oracle"]["channels"] == sum(model["variants"]["original"]["widths"].values())
    assert load_script("bench").main(["--report", str(out)]) == record


@pytest.mark.slow
def test_bench_cpu_tiny(tmp_path):
    """experiments/bench_cpu.py's tiny mode: every JAX conv impl against PyTorch (when installed)
    per direction, and the model section with its 50%-MACs cuts (round_to 1 and 8)."""
    out = tmp_path / "bench_cpu.json"
    script = load_script("bench_cpu")
    returned = script.main(["--mode", "tiny", "--skip", "malloc", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["models"] == json.loads(json.dumps(returned["models"]))
    with_torch = ["torch"] if script.torch is not None else []
    assert set(record["matmul"]) == {"size", "jax", *with_torch}
    backends = {*script.JAX_IMPLS, *with_torch}
    for row in record["conv_ops"]["resnet56"]:
        assert set(row["gflops"]) == {"forward", "input_grad", "kernel_grad"}
        for direction, by_impl in row["gflops"].items():
            assert set(by_impl) == backends, direction
            assert all(v > 0 for v in by_impl.values()), (direction, by_impl)
    impls = {"xla", "auto", *with_torch}
    for entry in record["models"].values():
        for prefix in ("", "pruned_r1_", "pruned_r8_"):
            assert entry[prefix + "macs"] > 0
            for mode in ("train", "infer"):
                for impl in impls:
                    row = entry[f"{prefix}{mode}/{impl}"]
                    assert row["images_per_s"] > 0 and row["minflt_per_call"] >= 0
                    rounds = row["rounds_images_per_s"]
                    assert len(rounds) == record["settings"]["rounds"] and min(rounds) > 0
                    assert min(rounds) <= row["images_per_s"] <= max(rounds)
                    if prefix:
                        macs_speedup = entry["macs"] / entry[prefix + "macs"]
                        assert row["speedup_over_macs_ratio"] * macs_speedup == pytest.approx(
                            row["speedup"]
                        )
        assert entry["pruned_r1_macs"] <= 0.5 * entry["macs"]
        assert entry["pruned_r8_macs"] <= 0.5 * entry["macs"]
    report = script.markdown_report(record)
    for name in record["models"]:
        assert f"**{name}**" in report
    assert report.count("| pruned_r8 | auto |") == len(record["models"])
    # The layers section: every convolution of both networks once per call, MACs as counted.
    for name, entry in record["layers"].items():
        for label, prefix in (("original", ""), ("pruned_r8", "pruned_r8_")):
            net = entry[label]
            arch = script.pruned_archs(script.model_arch(name))[prefix][0]
            shapes = jax.eval_shape(
                lambda a=arch: a.module().init(jax.random.key(0), jnp.zeros((1, *a.input_shape)))
            )
            kernels = [leaf for leaf in jax.tree.leaves(shapes) if leaf.ndim == 4]
            assert sum(layer["calls"] for layer in net["layers"]) == len(kernels), (name, label)
            conv_macs = sum(layer["calls"] * layer["macs"] for layer in net["layers"])
            assert 0 < conv_macs <= net["macs"] * record["settings"]["infer_batch"]
            assert net["network_ms"] > 0 and all(layer["ms"] > 0 for layer in net["layers"])
            # the suite's plan takes the thresholds: no candidate was timed
            assert all(layer["tuned_ms"] == {} for layer in net["layers"])
        assert f"**{name}**, inference" in report


@pytest.mark.slow
def test_bench_cpu_malloc_children_run_both_frameworks(tmp_path):
    """The malloc section: one child process per chosen allocator setting, jaxprune's ``auto``
    models and PyTorch's (when installed) in each; unknown settings are refused by name."""
    script = load_script("bench_cpu")
    with pytest.raises(SystemExit) as refused:
        script.main(["--mode", "tiny", "--malloc-settings", "default,bogus", "--out", "x.json"])
    assert refused.value.code == 2
    out = tmp_path / "malloc.json"
    argv = ["--mode", "tiny", "--skip", "conv_ops,models,layers", "--malloc-settings", "default"]
    record = script.main([*argv, "--out", str(out)])
    assert list(record["malloc"]) == ["default"]
    impls = ["auto", "torch"] if script.torch is not None else ["auto"]
    for entry in record["malloc"]["default"]["models"].values():
        for impl in impls:
            for mode in ("train", "infer"):
                assert entry[f"{mode}/{impl}"]["images_per_s"] > 0
    report = script.markdown_report(record)
    assert report.count("| default: JAXPRUNE_ALLOCATOR=system |") == len(impls) * len(
        record["malloc"]["default"]["models"]
    )


@pytest.mark.slow  # compiles the kernel source twice
def test_ab_conv_source_times_two_versions_of_the_kernels_against_each_other(capsys):
    from jaxprune.cpu import onednn

    if not os.environ.get("CI") and not onednn.winograd_supported():
        pytest.skip(f"needs the oneDNN library and AVX2: {onednn.unavailable_reason()}")
    argv = ["--base", "HEAD", "--shapes", "2x6x5x8x16", "--rounds", "2", "--calls", "1"]
    rows = load_script("ab_conv_source").main(argv)
    assert [row["shape"] for row in rows] == [(2, 6, 5, 8, 16)]
    assert all(len(t) == 2 and min(t) > 0 for t in rows[0]["ms"].values())
    assert "| 2x6x5x8 -> 16 |" in capsys.readouterr().out
