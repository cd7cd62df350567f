"""Two processes on localhost (CPU collectives over gloo) train exactly like one process."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import F32_EPS

from jaxprune import checkpoint, cli, pipeline
from jaxprune.train import MetricsLog

ARGV = [
    "train", "--model", "lenet5", "--data", "synthetic", "--synthetic-shape", "16,16,1",
    "--batch-size", "32", "--steps", "6", "--checkpoint-every", "3",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_two_devices_each_match_one_device(tmp_path):
    script = shutil.which("jaxprune") or str(Path(sys.executable).with_name("jaxprune"))
    multi = tmp_path / "multi"
    address = f"localhost:{_free_port()}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    processes = [
        subprocess.Popen(
            [
                script,
                *ARGV,
                "--workdir",
                multi,
                "--coordinator-address",
                address,
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=400))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    assert "done: step 6" in outputs[0][0] and "done:" not in outputs[1][0]  # process 0 reports

    single = tmp_path / "single"
    cli.main([*ARGV, "--workdir", str(single)])
    rows = {name: MetricsLog(path / "metrics.jsonl").read() for name, path in
            [("multi", multi), ("single", single)]}  # fmt: skip
    train_rows = {k: [r for r in v if "learning_rate" in r] for k, v in rows.items()}
    assert [r["num_devices"] for r in train_rows["multi"]] == [4] * 6
    for a, b in zip(train_rows["multi"], train_rows["single"], strict=True):
        # A mean over the batch summed in another order: as in test_train's 1-vs-8-device test.
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(
            b["loss"], abs=64 * F32_EPS * b["loss"]
        )
    assert rows["multi"][-1]["accuracy"] == rows["single"][-1]["accuracy"]
    # The checkpoint the two processes wrote together restores in one.
    assert checkpoint.steps(multi) == [3, 6]
    assert pipeline.evaluate(multi)["accuracy"] == rows["single"][-1]["accuracy"]
