"""The matplotlib plumbing of the benchmarks' PNGs: an optional import on the Agg backend, and one way to save."""

from __future__ import annotations

import os


def pyplot(what: str):
    """``matplotlib.pyplot`` on the Agg backend, or None (saying which picture is skipped) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as error:  # ImportError, or an installation that fails to load
        print(f"no {what}: matplotlib is unavailable ({type(error).__name__}: {error}); pip install matplotlib")
        return None
    return plt


def save(figure, path: str, tight: bool = False) -> str:
    """Lay out, write ``path`` (creating its folder) at 120 dpi, close the figure; returns ``path``. ``tight``:
    the saved area grows to hold every label and title (long tick labels that ``tight_layout`` cannot fit)."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=120, **({"bbox_inches": "tight", "pad_inches": 0.15} if tight else {}))
    plt.close(figure)
    return path
