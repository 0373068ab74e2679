"""The report's parts: the machine's description, Markdown tables, and PNG plots."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["bar_plot", "load_average", "machine", "percentile", "table"]


def machine() -> str:
    """Describe this machine in one line: every figure names the machine it ran on."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.system()}"


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages: the numbers depend on what else ran."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the ``fraction`` quantile of ``values`` (0 when there are none)."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1]


def table(
    header: Sequence[str], rows: Sequence[Sequence[object]], *, text_columns: int = 1
) -> list[str]:
    """Return a Markdown table: the first ``text_columns`` left-aligned, the numbers right."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def bar_plot(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    ylabel: str,
    path: Path,
    baseline: float | None = None,
) -> None:
    """Draw grouped bars (one group per entry of ``groups``, one bar per series)."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / max(1, len(series))
    middle = (len(series) - 1) / 2
    for offset, (name, values) in enumerate(series.items()):
        positions = [i + (offset - middle) * width for i in range(len(groups))]
        bars = axes.bar(positions, values, width, label=name)
        axes.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in values], fontsize=7)
    axes.set_xticks(range(len(groups)), groups, fontsize=8)
    axes.set_ylabel(ylabel)
    if baseline is not None:
        axes.axhline(baseline, color="grey", linewidth=0.8)
    top = max((v for values in series.values() for v in values), default=1.0)
    axes.set_ylim(0, top * 1.3 or 1.0)
    axes.set_title(title)
    axes.legend(loc="upper center", ncol=len(series), fontsize=8)
    axes.text(0.01, 0.01, machine(), transform=axes.transAxes, fontsize=6, color="grey")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
