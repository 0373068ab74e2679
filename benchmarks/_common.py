"""What the benchmark scripts share: the machine's description, rounds, and the report files."""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@dataclass
class Measured:
    """Rates of one (driver, variant) pair, one per round; the median is reported."""

    driver: str
    variant: str
    rates: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.system()}"


def ratio_table(
    results: dict[tuple[str, str], Measured],
    drivers: tuple[str, ...],
    variants: tuple[str, ...],
    unit: str,
) -> list[str]:
    """Return Markdown rows: each variant's rate, then its ratio to the first (the baseline)."""
    baseline = variants[0]
    header = ["driver", *(f"{v} {unit}" for v in variants), *(f"{v} ratio" for v in variants[1:])]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for driver in drivers:
        base = results[driver, baseline].rate
        rates = [f"{results[driver, v].rate:.1f}" for v in variants]
        ratios = [f"{results[driver, v].rate / base:.2f}x" for v in variants[1:]]
        lines.append("| " + " | ".join([driver, *rates, *ratios]) + " |")
    return lines


def ratio_plot(
    results: dict[tuple[str, str], Measured],
    drivers: tuple[str, ...],
    variants: tuple[str, ...],
    title: str,
    path: Path,
) -> None:
    """Draw grouped bars of each variant's ratio to the first variant, per driver."""
    import matplotlib  # noqa: PLC0415 - only the reports need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(variants)
    for offset, variant in enumerate(variants):
        ratios = [results[d, variant].rate / results[d, variants[0]].rate for d in drivers]
        middle = (len(variants) - 1) / 2
        positions = [i + (offset - middle) * width for i in range(len(drivers))]
        bars = axes.bar(positions, ratios, width, label=variant)
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks(range(len(drivers)), drivers)
    axes.set_ylabel(f"throughput / {variants[0]}")
    axes.set_ylim(0, 1.35)
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_title(title)
    axes.legend(loc="upper center", ncol=len(variants))
    axes.text(0.01, 0.01, machine(), transform=axes.transAxes, fontsize=6, color="grey")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
