"""PNG figures of pruning results: per-group widths, and accuracy against MACs."""

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def widths_and_accuracy_png(
    path: str,
    widths: Mapping[str, Mapping[str, int]],
    points: Sequence[tuple[str, float, float]],
    title: str = "",
) -> None:
    """Writes a two-panel PNG.

    Args:
      path: output file.
      widths: model label -> {group: channels}, every model over the same groups (forward order).
      points: (label, MACs, accuracy in [0, 1]) per model.
      title: figure title.
    """
    labels = list(widths)
    groups = list(next(iter(widths.values())))
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(max(10, 0.35 * len(groups) + 6), 4.5), gridspec_kw={"width_ratios": [3, 1]}
    )
    bar = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [g + (i - (len(labels) - 1) / 2) * bar for g in range(len(groups))]
        left.bar(xs, [widths[label][g] for g in groups], bar, label=label)
    left.set_xticks(range(len(groups)), groups, rotation=90, fontsize=7)
    left.set_ylabel("channels")
    left.set_title("width of every prunable group")
    left.legend()
    for label, macs, accuracy in points:
        right.scatter(macs / 1e6, 100 * accuracy, s=40)
        right.annotate(label, (macs / 1e6, 100 * accuracy), fontsize=8, xytext=(4, 4),
                       textcoords="offset points")  # fmt: skip
    right.set_xlabel("MMACs per image")
    right.set_ylabel("test accuracy (%)")
    right.set_title("accuracy vs MACs")
    right.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
