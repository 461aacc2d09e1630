"""The one place that sets up matplotlib: headless (Agg, no display on workers), one figure size
for every plot we attach to a materialization, and closing figures so long runs do not leak them."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


@contextmanager
def figure(path: Path, size: tuple[float, float] = (6, 3.2)):
    """Yields (fig, ax); on exit lays out, saves to `path` as PNG and closes the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
