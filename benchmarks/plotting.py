"""Charts for the benchmarks, from matplotlib (the `train` extra). Without it, one line says what to install and
the benchmark's CSV files still stand."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def save_figure(out: Path, draw: Callable[[Any], None], panels: int = 1, size: tuple[float, float] = (7, 4.5)) -> bool:
    """Draw `panels` side-by-side axes with `draw(axes)` and save them to `out`; False (and one line on stderr)
    when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: {out.name} not drawn: matplotlib is missing (pip install -e '.[bench]')", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, panels, figsize=(size[0] * panels, size[1]))
    draw(axes)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return True
