"""Pictures of numbers: training curves as PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from conceptflow.fileio import atomic_path


def save_curve(history: list[dict], destination: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history]
    figure, axis = plt.subplots(figsize=(4, 2.6), dpi=100)
    for key in sorted({k for row in history for k in row} - {"step"}):
        if key.startswith("loss"):
            axis.plot(steps, [row.get(key) for row in history], label=key)
    axis.set_xlabel("step")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(Path(destination)) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)
    return Path(destination)
