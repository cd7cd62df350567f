"""`jaxprune prune` with each method's protocol: the authors' GFI-AP, width rules, rounds."""

import json

import numpy as np
import pytest

from jaxprune import cli, methods

pytestmark = pytest.mark.slow  # trains a ResNet-20 and a VGG-11 (minutes on 2 cores)

SYNTHETIC = ["--data", "synthetic", "--synthetic-shape", "16,16,3", "--batch-size", "16"]


def _trained(tmp_path_factory, model: str):
    path = tmp_path_factory.mktemp(model) / "run"
    cli.main(["train", "--model", model, *SYNTHETIC, "--steps", "2", "--workdir", str(path)])
    return path


@pytest.fixture(scope="module")
def resnet20_run(tmp_path_factory):
    return _trained(tmp_path_factory, "resnet20")


@pytest.fixture(scope="module")
def vgg11_run(tmp_path_factory):
    return _trained(tmp_path_factory, "vgg11")


def _prune(source, out, *flags) -> dict:
    cli.main(["prune", "--workdir", str(source), "--out", str(out), "--no-eval", *map(str, flags)])
    return json.loads((out / "prune.json").read_text())


def test_gfi_ap_authors_cuts_only_the_blocks_first_convs(resnet20_run, tmp_path):
    record = _prune(
        resnet20_run, tmp_path / "out", "--method", "gfi_ap_authors", "--filters-ratio", "0.6",
        "--num-batches", "2", "--recalibrate-batches", "1",
    )  # fmt: skip
    before, after = record["widths_before"], record["widths_after"]
    inner = [g for g in before if "/block" in g]
    assert inner == [g for g in before if g.endswith("/conv1")] and len(inner) == 9
    for g in before:
        if g not in inner:
            assert after[g] == before[g], g  # stem, residual streams, projections: untouched
    kept = sum(after[g] for g in inner) / sum(before[g] for g in inner)
    assert 0.5 <= kept <= 0.7  # about the asked 60% of the prunable filters (ties, caps)
    assert record["policy"] == "threshold" and record["max_pruning_ratio"] is None
    assert "augmented" in record["scored_on"]


def test_gfi_ap_authors_never_touches_a_dense_layer(vgg11_run, tmp_path):
    record = _prune(
        vgg11_run, tmp_path / "out", "--method", "gfi_ap_authors", "--filters-ratio", "0.5",
        "--num-batches", "1", "--recalibrate-batches", "1",
    )  # fmt: skip
    before, after = record["widths_before"], record["widths_after"]
    assert after["fc1"] == before["fc1"]
    assert sum(after.values()) < sum(before.values())


def test_cli_default_cap_holds_and_is_recorded(resnet20_run, tmp_path):
    record = _prune(
        resnet20_run, tmp_path / "out", "--method", "gfi", "--macs-ratio", "0.4",
        "--prunable", "all", "--num-batches", "1", "--recalibrate-batches", "1",
    )  # fmt: skip
    assert record["max_pruning_ratio"] == methods.DEFAULT_MAX_PRUNING_RATIO
    assert record["prunable"] == ["*"]
    for g, n in record["widths_before"].items():
        assert record["widths_after"][g] >= np.ceil(0.2 * n - 1e-9), g
    assert record["macs_after"] <= 0.4 * record["macs_before"]
    assert isinstance(record["bound_by_rules"], list)


def test_rounds_reach_the_budget_and_keep_the_cap_of_the_start(resnet20_run, tmp_path):
    out = tmp_path / "out"
    record = _prune(
        resnet20_run, out, "--method", "l1", "--macs-ratio", "0.5", "--rounds", "2",
        "--round-steps", "1", "--max-pruning-ratio", "0.6", "--recalibrate-batches", "0",
    )  # fmt: skip
    assert record["round"] == 2 and len(record["history"]) == 1
    assert record["history"][0]["round_target"] == pytest.approx(0.75)
    assert (out / "rounds" / "round1" / "prune.json").exists()
    first = json.loads((out / "rounds" / "round1" / "prune.json").read_text())
    start = first["widths_before"]
    assert record["macs_after"] <= 0.5 * first["macs_before"] * (1 + 1e-9)
    # the final record describes the whole run: the network it started from, before
    assert {k: record[k] for k in first if k.endswith("_before")} == {
        k: first[k] for k in first if k.endswith("_before")
    }
    assert record["macs_after"] / record["macs_before"] <= 0.5 * (1 + 1e-9)
    for g, n in start.items():
        assert record["widths_after"][g] >= np.ceil(0.4 * n - 1e-9), g


def test_bad_selection_settings_are_refused_before_any_work(resnet20_run, tmp_path, capsys):
    cases = {
        "cap with the threshold": (["--method", "gfi_ap_authors", "--filters-ratio", "0.5",
                                    "--max-pruning-ratio", "0.5"], "no --max-pruning-ratio"),
        "rounds without steps": (["--method", "l1", "--macs-ratio", "0.5", "--rounds", "2"],
                                 "--round-steps"),
        "unreachable": (["--method", "l1", "--macs-ratio", "0.2", "--prunable", "*/conv1"],
                        "binding groups"),
        "no such group": (["--method", "l1", "--macs-ratio", "0.5", "--prunable", "fc9"],
                          "matches no group"),
        "bad cap": (["--method", "l1", "--macs-ratio", "0.5", "--max-pruning-ratio", "1"],
                    "fraction in [0, 1) or none"),
    }  # fmt: skip
    for name, (flags, text) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["prune", "--workdir", str(resnet20_run), "--out", str(out), *flags])
        err = capsys.readouterr().err
        assert exit_info.value.code != 0, name
        assert len(err.strip().splitlines()) == 1 and text in err, (name, err)
        assert not out.exists(), name


def test_layerwise_cuts_the_one_shot_choice_one_group_at_a_time(tmp_path_factory, tmp_path):
    path = tmp_path_factory.mktemp("lenet") / "run"
    cli.main(["train", "--model", "lenet5", "--data", "synthetic", "--synthetic-shape", "16,16,1",
              "--batch-size", "16", "--steps", "2", "--workdir", str(path)])  # fmt: skip
    flags = ("--method", "gfi_ap_authors", "--filters-ratio", "0.5", "--num-batches", "2")
    one_shot = _prune(path, tmp_path / "one_shot", *flags)
    layered = _prune(path, tmp_path / "layered", *flags, "--layerwise", "--round-steps", "1")
    assert layered["widths_after"] == one_shot["widths_after"]
    assert layered["layers"] == ["conv1", "conv2"] and layered["layer"] == "conv2"
    first = json.loads((tmp_path / "layered" / "rounds" / "layer1" / "prune.json").read_text())
    assert first["widths_after"]["conv1"] == one_shot["widths_after"]["conv1"]
    assert first["widths_after"]["conv2"] == first["widths_before"]["conv2"]
    for key in ("widths_before", "macs_before", "params_before"):  # the whole run's record
        assert layered[key] == one_shot[key]
