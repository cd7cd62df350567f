"""The main job, ``jaxprune demo``: GFI-AP against uniform L1 pruning at the same MACs budget.

It trains a baseline, prunes it twice to the same MACs budget — the recommended GFI-AP
(``jaxprune.methods.get("gfi")``: adaptive, non-uniform widths under the default cap) and uniform
L1-norm widths (the baseline GFI-AP is judged against) — re-estimates BatchNorm and fine-tunes both
with the same budget, then reports accuracy, MACs, params and measured inference throughput, says
which pruned network is more accurate, and writes
``demo.json`` and ``demo.png`` (per-group widths; accuracy against MACs) into the run's directory.
"""

import dataclasses
import datetime
import json
from pathlib import Path

import jax

from jaxprune import methods, pipeline, plots, timing
from jaxprune.flops import count_macs, count_params
from jaxprune.graph import groups
from jaxprune.train.optim import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo runs: by default a 300-step baseline and 100 fine-tuning steps per pruned
    model (its time on a 2-core CPU is in ``experiments/RESULTS.md``); `FULL` is the longer run.

    Attributes:
      model: a name of `jaxprune.models.names()`.
      data: dataset name (default: the Debian Fashion-MNIST).
      train_steps: baseline training steps.
      finetune_steps: fine-tuning steps of each pruned model (the same for both).
      batch_size: global batch size.
      macs_ratio: fraction of the baseline's MACs the pruned models keep.
      learning_rate: peak SGD learning rate of training and fine-tuning.
      seed: fixes initialization, data order and augmentation.
      data_dir: where the data lives, if not in the default place.
      timing_batch_size: batch of the inference-throughput measurement.
    """

    model: str = "resnet20"
    data: str = "fashion_mnist"
    train_steps: int = 300
    finetune_steps: int = 100
    batch_size: int = 128
    macs_ratio: float = 0.5
    learning_rate: float = 0.1
    seed: int = 0
    data_dir: str | None = None
    timing_batch_size: int = 256


FULL = DemoConfig(train_steps=4690, finetune_steps=1407)  # 10 and 3 epochs of Fashion-MNIST

# label -> (method, selection policy, max_pruning_ratio): the recommended GFI-AP as the command
# line runs it, and the uniform baseline (a uniform fraction needs no cap).
PRUNED = {
    "GFI-AP (adaptive)": ("gfi", "adaptive", methods.DEFAULT_MAX_PRUNING_RATIO),
    "L1 (uniform)": ("l1", "uniform", None),
}


def default_workdir() -> Path:
    return Path("runs") / datetime.datetime.now().strftime("demo-%Y%m%d-%H%M%S")


def run(config: DemoConfig, workdir: str | Path, progress: bool | None = None) -> dict:
    """Runs the demo in ``workdir`` (resumable: finished stages are kept) and returns its record."""
    workdir = Path(workdir)
    train_config = pipeline.TrainConfig(
        model=config.model,
        data=config.data,
        num_steps=config.train_steps,
        batch_size=config.batch_size,
        seed=config.seed,
        optimizer=OptimizerConfig(learning_rate=config.learning_rate),
        data_dir=config.data_dir,
    )
    base = workdir / "baseline"
    print(f"[1/4] training the baseline {config.model} for {config.train_steps} steps", flush=True)
    accuracies = {"original": pipeline.train(train_config, base, progress=progress)["accuracy"]}

    runs = {"original": base}
    for i, (label, (method, policy, cap)) in enumerate(PRUNED.items()):
        out = workdir / method
        runs[label] = out
        print(f"[{2 + i}/4] {label}: pruning to {config.macs_ratio:.0%} of the MACs", flush=True)
        if not (out / pipeline.PRUNE_FILE).exists():
            pipeline.prune(
                base,
                out,
                method,
                pipeline.Budget(pipeline.BudgetKind.MACS, config.macs_ratio),
                policy=policy,
                max_pruning_ratio=cap,
                evaluate_before_after=False,
                data_dir=config.data_dir,
            )
        result = pipeline.finetune(out, num_steps=config.finetune_steps, progress=progress)
        accuracies[label] = result["accuracy"]

    print("[4/4] evaluating and timing inference", flush=True)
    rows = {}
    for label, path in runs.items():
        arch, variables = pipeline.load(path)
        speed = timing.inference_timing(arch, variables, config.timing_batch_size)
        rows[label] = {
            "accuracy": accuracies[label],
            "macs": count_macs(arch),
            "params": count_params(arch),
            "images_per_s": speed.images_per_s,
            "widths": groups(arch),
        }
    record = {
        "config": dataclasses.asdict(config),
        "device": jax.devices()[0].device_kind,
        "date": datetime.date.today().isoformat(),
        "models": rows,
    }
    (workdir / "demo.json").write_text(json.dumps(record, indent=1))
    plots.widths_and_accuracy_png(
        str(workdir / "demo.png"),
        {label: row["widths"] for label, row in rows.items()},
        [(label, row["macs"], row["accuracy"]) for label, row in rows.items()],
        title=f"{config.model} on {config.data}: pruned to {config.macs_ratio:.0%} of the MACs",
    )
    print(format_table(rows))
    print(verdict(rows))
    print(f"wrote {workdir / 'demo.json'} and {workdir / 'demo.png'}")
    return record


def verdict(rows: dict[str, dict]) -> str:
    """One line: whether GFI-AP's pruned network is more accurate than uniform L1's."""
    gfi, l1 = (rows[label]["accuracy"] for label in PRUNED)
    gap = 100 * (gfi - l1)
    if gap > 0:
        return f"GFI-AP is ahead of uniform L1 by {gap:.2f} points at this budget."
    return f"GFI-AP is NOT ahead of uniform L1 here: {gap:+.2f} points at this budget."


def format_table(rows: dict[str, dict]) -> str:
    """Plain-text table of accuracy, MACs, params and throughput, with ratios to the original."""
    original = next(iter(rows.values()))
    lines = [
        f"{'model':<20}{'accuracy':>9}{'MMACs':>9}{'params':>10}{'images/s':>10}"
        f"{'MACs cut':>10}{'speed-up':>10}"
    ]
    for label, row in rows.items():
        lines.append(
            f"{label:<20}{row['accuracy']:>9.4f}{row['macs'] / 1e6:>9.2f}{row['params']:>10,}"
            f"{row['images_per_s']:>10.0f}{original['macs'] / row['macs']:>9.2f}x"
            f"{row['images_per_s'] / original['images_per_s']:>9.2f}x"
        )
    return "\n".join(lines)
