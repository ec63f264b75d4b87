"""Benchmarks of ``optim`` against its peers: ``python -m benchmarks <name> [--quick] [--device D] [--out DIR]``.

Each benchmark module exposes ``run(device, quick, out_dir, headline) -> dict`` (pictures go to ``out_dir``): it
times ours and the peer on the same inputs in one process, prints a table and returns the rows, which
``python -m benchmarks`` writes to ``DIR/<name>.json`` together with the device, the torch version, the date and the
command line. ``headline=True`` (``--gpu-headline``) runs only the module's headline comparisons, at sizes an H200
finishes in <= 45 s (``--quick`` sizes with ``quick=True``); ``benchmarks/gpu_check.sh`` runs them.
"""

# name -> module under ``benchmarks``; ``all`` runs them in this order.
BENCHMARKS = {
    "steps": "steps",
    "hvp": "hvp",
    "curvature": "curvature",
    "spectrum": "spectrum",
    "sophia": "sophia",
    "stiefel": "stiefel",
    "lowrank": "lowrank",
    "attention": "attention",
}

__all__ = ["BENCHMARKS"]
