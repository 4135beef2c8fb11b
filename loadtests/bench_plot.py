"""Grouped bar charts for the router benchmarks: each part describes its panels, this draws them
side by side in one PNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Panel:
    """One chart: a bar per series within each group (e.g. a target per scenario)."""

    title: str
    groups: list[str]
    series: dict[str, list[float]]
    slanted: bool = False  # long group names


def save_panels(panels: list[Panel], out: Path) -> None:
    """Draw `panels` in a row and save them to `out` (nothing to draw: no file)."""
    if not panels:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    axes = list(axes) if len(panels) > 1 else [axes]
    for ax, panel in zip(axes, panels, strict=True):
        width = 0.8 / len(panel.series)
        for i, (label, values) in enumerate(panel.series.items()):
            ax.bar([x + i * width for x in range(len(panel.groups))], values, width, label=label)
        ax.set_xticks([x + width * (len(panel.series) - 1) / 2 for x in range(len(panel.groups))])
        if panel.slanted:
            ax.set_xticklabels(panel.groups, rotation=20, ha="right", fontsize=8)
        else:
            ax.set_xticklabels(panel.groups)
        ax.set_title(panel.title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"\nplot saved to {out}")
