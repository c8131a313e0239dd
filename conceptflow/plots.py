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


def save_heatmap(values, destination: Path, size: int) -> Path:
    """A [0, 1] map (e.g. a cross-attention map) as a colour PNG of ``size`` x ``size`` pixels."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    array = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    coloured = (colormaps["inferno"](array)[..., :3] * 255).round().astype(np.uint8)
    image = Image.fromarray(coloured).resize((size, size), Image.Resampling.NEAREST)
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(destination)) as temporary:
        image.save(temporary, format="PNG")
    return Path(destination)
