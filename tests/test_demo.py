"""The main job runs end to end (tiny version on the real Fashion-MNIST) and refuses bad input."""

import json

import pytest

from jaxprune import cli, demo


@pytest.mark.slow
def test_tiny_demo_writes_table_json_and_png(tmp_path, capsys):
    config = demo.DemoConfig(model="lenet5", train_steps=4, finetune_steps=2, timing_batch_size=8)
    record = demo.run(config, tmp_path, progress=False)
    out = capsys.readouterr().out
    assert "GFI-AP (adaptive)" in out and "L1 (uniform)" in out and "speed-up" in out
    assert "ahead of uniform L1" in out
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved == json.loads(json.dumps(record))
    rows = saved["models"]
    assert list(rows) == ["original", "GFI-AP (adaptive)", "L1 (uniform)"]
    original = rows["original"]
    for label in ("GFI-AP (adaptive)", "L1 (uniform)"):
        assert rows[label]["macs"] <= 0.5 * original["macs"]
        assert 0 <= rows[label]["accuracy"] <= 1 and rows[label]["images_per_s"] > 0
    uniform = rows["L1 (uniform)"]["widths"]
    fractions = [uniform[g] / n for g, n in original["widths"].items()]
    assert max(fractions) - min(fractions) <= 1 / 6 + 1e-9
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, text",
    [
        (["demo", "--model", "resnet57"], "unknown model 'resnet57'; valid models: lenet5"),
        (["demo", "--macs-ratio", "1.5"], "--macs-ratio must lie in (0, 1]"),
    ],
)
def test_demo_bad_input_is_one_line(argv, text, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert len(err.strip().splitlines()) == 1 and text in err
    assert not (tmp_path / "run").exists()
