"""Plots of the spectral estimates: :func:`plot_density` draws a :class:`~optim.hessian.spectrum.SpectralDensity`.

The density φ_σ(t) (G,) on its grid (G,) is drawn as a curve, on a log axis by default: a Hessian's few outliers
carry a mass of ~1/n each next to the bulk at 0, which a linear axis would show as nothing. matplotlib is an
optional extra, imported only when a plot is drawn; the figure is drawn on an Agg canvas of its own, so pyplot's
global state and the user's backend are left alone.
"""

from __future__ import annotations

import torch

__all__ = ["plot_density"]


def plot_density(density_result, path, *, log: bool = True, title: str | None = None):
    """Save the spectral density as a PNG at ``path`` and return the path.

    ``density_result`` is a :class:`SpectralDensity` or a ``(grid, density)`` pair. ``log=True`` plots the density
    on a log axis (a Hessian's outliers carry a tiny mass next to the bulk at 0), clipped below at 1e-12 × its
    maximum so the empty tails do not dominate. Needs matplotlib (an optional extra); it draws on an Agg canvas
    without touching pyplot's global state or the user's backend.
    """
    grid, density = density_result
    grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
    density = torch.as_tensor(density, dtype=torch.float64).cpu()
    if grid.ndim != 1 or density.shape != grid.shape:
        raise ValueError(
            f"density_result must hold a 1-D grid and a density of the same shape, got {tuple(grid.shape)} and "
            f"{tuple(density.shape)}"
        )
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "plot_density needs matplotlib, an optional extra: pip install matplotlib"
        ) from error
    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if log:
        floor = max(density.max().item(), 1e-300) * 1e-12
        axes.semilogy(grid.numpy(), density.clamp(min=floor).numpy())
    else:
        axes.plot(grid.numpy(), density.numpy())
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density (log scale)" if log else "density")
    if title is not None:
        axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
