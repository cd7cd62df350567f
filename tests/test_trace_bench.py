"""experiments/bench_trace.py runs (small widths) and reports what RESULTS.md section 5 reads."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


@pytest.mark.slow
def test_bench_trace_tiny(tmp_path):
    import bench_trace

    bench_trace.main(["--tiny", "--json", str(tmp_path / "out.json")])
    results = json.loads((tmp_path / "out.json").read_text())
    assert [m["model"] for m in results["models"]] == ["resnet18", "mobilenetv2"]
    for m in results["models"]:
        assert m["trace_s"] > 0 and m["speedup"] > 0
        assert m["xla_flops_per_batch"]["pruned"] < 0.5 * m["xla_flops_per_batch"]["full"]
        assert m["macs_per_image"]["pruned"] < 0.5 * m["macs_per_image"]["full"]
