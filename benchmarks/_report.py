"""The combined report of ``python -m benchmarks``: one headline table over every benchmark, and its ratio bars.

Each benchmark writes its own JSON with every row it measured; this module picks from each the comparisons a user
asks about first (ours against what they run today, in the same run) and writes them as ``summary.md`` and
``summary.json``, plus ``ratios.png``: one bar per comparison, the peer's time over ours on a log axis (right of 1 =
ours faster). A benchmark whose JSON lacks a row (a peer not installed, a row that failed) just has fewer headlines.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable

from ._plots import pyplot, save

Headline = dict


def _headline(benchmark: str, case: str, what: str, ours: tuple[str, float | None],
              peer: tuple[str, float | None], unit: str) -> Headline | None:
    """A comparison of two times (smaller is better); ``ratio`` = peer / ours, so > 1 means ours is faster."""
    (ours_label, ours_value), (peer_label, peer_value) = ours, peer
    if ours_value is None or peer_value is None or not ours_value > 0 or not peer_value > 0:
        return None
    return {"benchmark": benchmark, "case": case, "what": what, "ours": ours_label, "ours_value": ours_value,
            "peer": peer_label, "peer_value": peer_value, "unit": unit, "ratio": peer_value / ours_value}


def _first(rows: Iterable[dict], **match) -> dict | None:
    return next((row for row in rows if all(row.get(key) == value for key, value in match.items())), None)


def _value(row: dict | None, key: str) -> float | None:
    return None if row is None else row.get(key)


def _steps(result: dict) -> list[Headline | None]:
    rows = result.get("rows", [])
    out = []
    for key in dict.fromkeys((row["set"], row["dtype"]) for row in rows):
        subset = [row for row in rows if (row["set"], row["dtype"]) == key]
        ours = _first(subset, impl="optim.AdamW")
        what = "AdamW step"
        if ours is not None and ours.get("fraction_of_copy_bandwidth") is not None:
            what += f" ({100 * ours['fraction_of_copy_bandwidth']:.0f}% of copy bandwidth)"
        for peer in ("torch fused", "torch foreach"):
            out.append(_headline("steps", f"{key[0]} {key[1]}", what,
                                 ("optim.AdamW", _value(ours, "median_ms")),
                                 (f"torch.optim.AdamW ({peer.split()[1]})", _value(_first(subset, impl=peer),
                                                                                  "median_ms")), "ms"))
    return out


def _hvp(result: dict) -> list[Headline | None]:
    out = []
    for case in result.get("cases", []):
        one_probe = _first(case["rows"], method="rr", probes=1)
        for probes in (1, 8):
            rows = [row for row in case["rows"] if row.get("probes") == probes]
            peer = (f"{probes} x one-probe double backward (forward each time)" if probes > 1 else "double backward",
                    None if one_probe is None else probes * one_probe["ms"])
            out.append(_headline("hvp", case["name"], f"{probes} HVP{'s' if probes > 1 else ''}, one call",
                                 ("optim.hvp + fused CE", _value(_first(rows, method="fused"), "ms")), peer, "ms"))
            for ours, theirs, what in (("fused", "cl-hvp", "HVP"), ("ggn-fresh", "cl-ggn", "GGN product")):
                curvlinops = _first(rows, method=theirs)
                if curvlinops is not None and "ms" in curvlinops:
                    label = "optim.hvp + fused CE" if ours == "fused" else "optim.GGNOperator, fresh forward"
                    out.append(_headline("hvp", case["name"], f"{probes} x {what}, one call, vs curvlinops 3",
                                         (label, _value(_first(rows, method=ours), "ms")),
                                         (f"curvlinops {what}", curvlinops["ms"]), "ms"))
        compiled = _first(case["rows"], method="compiled", probes=1)
        if compiled is not None:
            what = f"1 HVP, compiled (compile {compiled.get('compile_seconds', 0):.0f} s)"
            out.append(_headline("hvp", case["name"], what,
                                 ("optim.hvp(compile=True)", _value(compiled, "ms")),
                                 ("double backward", None if one_probe is None else one_probe["ms"]), "ms"))
    kernel = result.get("cross_entropy_kernel") or {}
    methods = kernel.get("methods", [])
    if methods:
        out.append(_headline("hvp", f"CE Hessian, {kernel.get('rows')}x{kernel.get('vocab')}", "H·u of the loss",
                             ("optim::cross_entropy_hvp", _value(_first(methods, method="fused kernel"), "ms")),
                             ("eager double backward", _value(_first(methods, method="eager double backward"), "ms")),
                             "ms"))
    return out


def _curvature(result: dict) -> list[Headline | None]:
    out = []
    for case in result.get("cases", []):
        rows = case["rows"]
        probes = max(row["probes"] for row in rows)

        def ms(method):
            return _value(_first(rows, method=method), "ms")

        out.append(_headline("curvature", case["name"], f"{probes} HVPs on one linearization",
                             (f"optim.hvp k={probes}", ms(f"optim.hvp k={probes}")),
                             (f"plain loop k={probes} on a retained graph", ms(f"plain loop k={probes}")), "ms"))
        compile_s = case.get("compile_seconds")
        out.append(_headline("curvature", case["name"],
                             "1 HVP, compiled" + (f" (compile {compile_s:.0f} s)" if compile_s else ""),
                             ("optim.hvp(compile=True)", ms("optim.hvp compile=True k=1")),
                             ("torch double backward", ms("torch double backward k=1")), "ms"))
    return out


def _spectrum(result: dict) -> list[Headline | None]:
    out = []
    for case in result.get("cases", []):
        tasks = ["top eigenvalue"] + sorted({row["task"] for row in case["rows"]
                                             if row.get("task", "").startswith("top eigenvalue to")}) + ["trace"]
        for task in tasks:
            rows = [row for row in case["rows"] if row.get("task") == task]
            for peer in (row for row in rows if not row["method"].startswith("optim") and "seconds" in row):
                # the benchmark names which of ours it compared with (the fastest at least as accurate as the peer)
                compared = peer.get("compared_with")
                ours = next((row for row in rows if row["method"] == compared or
                             (compared is None and row["method"].startswith("optim"))), None)
                if ours is None:
                    continue
                what = task
                if task == "trace" and ours.get("hvps") != peer.get("hvps", ours.get("hvps")):
                    what += f" (the peer stopped after {peer['hvps']} of {ours['hvps']} probes: not comparable)"
                if task.startswith("top eigenvalue") and "relative_error" in ours and "relative_error" in peer:
                    what += f" (rel. err {ours['relative_error']:.1e} vs {peer['relative_error']:.1e}" + \
                        (", the peer's tightest setting: its time is a lower bound" if peer.get("reached") is False
                         else "") + ")"
                out.append(_headline("spectrum", case["name"], what, (ours["method"], ours["seconds"]),
                                     (peer["method"], peer["seconds"]), "s"))
    return out


def _sophia(result: dict) -> list[Headline | None]:
    rows = result.get("rows", [])
    model = result.get("model", "")
    if isinstance(model, dict):  # GPT-shaped: layers, width, vocabulary
        default_case = (model.get("name") or f"GPT {model.get('layers')}L d={model.get('d')} "
                        f"vocab {model.get('vocab')}")
    else:
        default_case = str(model)
    out = []
    for case in dict.fromkeys(row.get("case", default_case) for row in rows):
        subset = [row for row in rows if row.get("case", default_case) == case]
        adamw = _first(subset, impl="torch.optim.AdamW (fused)")
        for name in ("SophiaH", "AdaHessian"):
            pairs = ((f"optim.{name} refresh step", f"pytorch_optimizer.{name} update_period=1", "refresh step"),
                     (f"optim.{name} update_period=10 (mean of 10)",
                      f"pytorch_optimizer.{name} update_period=10 (mean of 10)", "update_period=10, mean step"))
            for ours_impl, peer_impl, what in pairs:
                out.append(_headline("sophia", str(case), f"{name} {what}",
                                     (ours_impl, _value(_first(subset, impl=ours_impl), "ms_per_step")),
                                     (peer_impl, _value(_first(subset, impl=peer_impl), "ms_per_step")), "ms"))
            between = _first(subset, impl=f"optim.{name} between refreshes")
            out.append(_headline("sophia", str(case), f"{name} between refreshes vs AdamW",
                                 (f"optim.{name} between refreshes", _value(between, "ms_per_step")),
                                 ("torch.optim.AdamW (fused)", _value(adamw, "ms_per_step")), "ms"))
    kernels = result.get("kernel_rows", [])
    adamw_kernel = _first(kernels, impl="torch.optim.AdamW step")
    for op in ("fused_sophia_", "fused_adahessian_"):
        row = _first(kernels, impl=f"{op} between refreshes")
        what = "update alone, between refreshes"
        if row is not None:
            what += f" ({100 * row['fraction_of_copy_bandwidth']:.0f}% of copy bandwidth)"
        out.append(_headline("sophia", (result.get("kernel_case") or {}).get("description", "kernels"), what,
                             (f"optim::{op}", _value(row, "median_ms")),
                             ("torch.optim.AdamW(fused=True).step()", _value(adamw_kernel, "median_ms")), "ms"))
    return out


def _stiefel(result: dict) -> list[Headline | None]:
    rows = result.get("step_rows", [])
    out = []
    for size in dict.fromkeys(row["size"] for row in rows):
        subset = [row for row in rows if row["size"] == size]
        ours = _first(subset, impl="ours: RSDM-P step")
        for peer, label in (("geoopt Stiefel (cayley)", "geoopt Stiefel (cayley)"),
                            ("ours: RGD qr", "RGD-QR (full QR retraction)"),
                            ("naive RSDM-P (PyTorch)", "naive RSDM-P (PyTorch)")):
            out.append(_headline("stiefel", size, "one step", ("optim.RSDM (permutation)", _value(ours, "median_ms")),
                                 (label, _value(_first(subset, impl=peer), "median_ms")), "ms"))
        looped = _first(subset, impl="ours: RSDM-P step, loop mean")
        if looped is not None:
            out.append(_headline("stiefel", size, "one step, mean of 100 in a loop (default re-orthonormalization)",
                                 ("optim.RSDM (permutation)", _value(looped, "median_ms")),
                                 ("naive RSDM-P (PyTorch)",
                                  _value(_first(subset, impl="naive RSDM-P (PyTorch), loop mean"), "median_ms")), "ms"))
    for key, problem in (("gap_rows", "PCA"), ("procrustes_gap_rows", "Procrustes")):
        gaps = result.get(key, [])
        ours = next((row for row in gaps if row["impl"].startswith("RSDM-P (optim")), None)
        for prefix in ("RGD-QR", "RSDM-P (naive", "geoopt"):
            peer = next((row for row in gaps if row["impl"].startswith(prefix)), None)
            if ours is not None and peer is not None:
                out.append(_headline("stiefel", f"{problem} n={ours.get('n')} p={ours.get('p')}", "time to 1e-6 gap",
                                     (ours["impl"], ours.get("seconds_to_gap")),
                                     (peer["impl"], peer.get("seconds_to_gap")), "s"))
    return out


def _lowrank(result: dict) -> list[Headline | None]:
    out = []
    rows = result.get("refactorize_rows", [])
    for key in dict.fromkeys((row["config"], row["layers"], row["m"], row["r"], row["n"]) for row in rows):
        subset = [row for row in rows if (row["config"], row["layers"], row["m"], row["r"], row["n"]) == key]
        out.append(_headline("lowrank", f"{key[1]} x ({key[2]}, {key[3]}, {key[4]})", "refactorization",
                             ("optim::lowrank_refactorize_", _value(_first(subset, impl="optim op"), "median_ms")),
                             ("dense SVD of W", _value(_first(subset, impl="dense SVD of W"), "median_ms")), "ms"))
    train = result.get("train_rows", [])
    for config in dict.fromkeys(row["config"] for row in train):
        subset = [row for row in train if row["config"] == config]
        ours = _first(subset, method="low-rank + refactor/reset")
        for peer in ("full-rank AdamW", "GaLore"):
            # seconds per token, so that the ratio reads like the time ratios (> 1: ours faster)
            out.append(_headline("lowrank", config, "training time per token (runs one after another, not "
                                 "interleaved: sensitive to load)",
                                 ("low-rank + refactor/reset", _per_token(ours)),
                                 (peer, _per_token(_first(subset, method=peer))), "µs/token"))
    return out


def _per_token(row: dict | None) -> float | None:
    if row is None or not row.get("tokens_per_s"):
        return None
    return 1e6 / row["tokens_per_s"]


EXTRACTORS: dict[str, Callable[[dict], list[Headline | None]]] = {
    "steps": _steps, "hvp": _hvp, "curvature": _curvature, "spectrum": _spectrum, "sophia": _sophia,
    "stiefel": _stiefel,
    "lowrank": _lowrank,
}


def headlines(records: dict[str, dict]) -> list[Headline]:
    """The headline comparisons of every benchmark record (name -> the JSON that benchmark wrote)."""
    out = []
    for name, record in records.items():
        extractor = EXTRACTORS.get(name)
        if extractor is None:
            continue
        try:
            out.extend(row for row in extractor(record) if row is not None)
        except (KeyError, TypeError) as error:  # a result written by another version of a benchmark
            print(f"summary: skipped {name}: its JSON lacks {error}")
    return out


def _format(value: float, unit: str) -> str:
    return f"{value:.3g} {unit}" if value < 1000 else f"{value:,.0f} {unit}"


def markdown(rows: list[Headline], records: dict[str, dict]) -> str:
    first = next(iter(records.values()), {})
    loads = {name: (record.get("other_processes_cpu_fraction") or {}).get("during")
             for name, record in records.items()}
    lines = [
        "# Benchmark summary",
        "",
        f"Device: {first.get('device_name', '?')} ({first.get('device', '?')}), "
        f"torch {first.get('torch_version', '?')}, {first.get('date_utc', '?')}, `{first.get('command', '?')}`"
        + (" (quick mode: small sizes, a smoke run)" if first.get("quick") else "") + ".",
        "",
        "`ratio` = the peer's time over ours, measured in the same run: above 1, ours is faster.",
        "",
    ]
    busy = {name: fraction for name, fraction in loads.items() if fraction is not None and fraction > 0.1}
    if busy:
        lines += ["Other processes used " + ", ".join(f"{100 * f:.0f}% ({n})" for n, f in busy.items())
                  + " of the CPUs during these runs: absolute times are inflated.", ""]
    lines += ["| benchmark | case | what | ours | peer | ours | peer | ratio |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['benchmark']} | {row['case']} | {row['what']} | {row['ours']} | {row['peer']} | "
                     f"{_format(row['ours_value'], row['unit'])} | {_format(row['peer_value'], row['unit'])} | "
                     f"{row['ratio']:.2f}× |")
    if not rows:
        lines.append("| (no comparison: every peer missing?) | | | | | | | |")
    return "\n".join(lines) + "\n"


# The families of the package, in the order the picture shows them, and the benchmarks of each.
FAMILIES = (("fused AdamW", ("steps",)), ("curvature", ("hvp", "curvature", "spectrum")),
            ("second-order optimizers", ("sophia",)), ("Stiefel", ("stiefel",)), ("low-rank", ("lowrank",)))


def plot_ratios(rows: list[Headline], path: str) -> str | None:
    """Horizontal bars of peer time / our time on a log axis, grouped by family under a bold heading; every label
    and title inside the saved figure. None (and a message) without matplotlib."""
    plt = pyplot("ratios.png")
    if plt is None or not rows:
        return None
    import textwrap

    known = {name for _, names in FAMILIES for name in names}
    families = list(FAMILIES) + [("other", tuple(sorted({r["benchmark"] for r in rows} - known)))]
    entries = []  # (label, ratio or None for a heading)
    for family, names in families:
        chosen = [row for row in rows if row["benchmark"] in names]
        if not chosen:
            continue
        entries.append((family, None))
        for row in chosen:
            label = f"{row['case']}: {row['what']} vs {row['peer']}"
            entries.append(("\n".join(textwrap.wrap(label, 64, max_lines=2, placeholder=" …")), row["ratio"]))
    ratios = [ratio for _, ratio in entries if ratio is not None]
    lines = sum(label.count("\n") + 1 for label, _ in entries)
    figure, axes = plt.subplots(figsize=(12, 0.26 * lines + 1.4))
    positions = list(range(len(entries)))
    for y, (label, ratio) in zip(positions, entries):
        if ratio is not None:
            axes.barh(y, ratio, color="tab:green" if ratio >= 1 else "tab:red", left=0, height=0.7)
            axes.text(ratio, y, f" {ratio:.2g}×", va="center", fontsize=7)
    axes.set_xscale("log")
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_yticks(positions, [label for label, _ in entries], fontsize=7)
    for tick, (_, ratio) in zip(axes.get_yticklabels(), entries):
        if ratio is None:
            tick.set_fontweight("bold")
            tick.set_fontsize(8)
    axes.set_ylim(len(entries) - 0.5, -0.5)
    axes.set_xlabel("peer time / our time (log scale; right of 1: ours faster)")
    axes.set_title("optim against its peers, one run per benchmark (summary.md has the numbers)", fontsize=9)
    low, high = min(ratios), max(ratios)
    axes.set_xlim(min(0.5, low / 1.5), max(2.0, high * 2.0))
    return save(figure, path, tight=True)


def write_summary(out_dir: str, names: Iterable[str]) -> dict:
    """Read ``out_dir/<name>.json`` of each benchmark that wrote one; write summary.md, summary.json, ratios.png."""
    records = {}
    for name in names:
        path = os.path.join(out_dir, f"{name}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as file:
                records[name] = json.load(file)
    rows = headlines(records)
    rows = [row for row in rows if math.isfinite(row["ratio"])]
    paths = {"markdown": os.path.join(out_dir, "summary.md"), "json": os.path.join(out_dir, "summary.json")}
    with open(paths["markdown"], "w", encoding="utf-8") as file:
        file.write(markdown(rows, records))
    with open(paths["json"], "w", encoding="utf-8") as file:
        json.dump({"headlines": rows}, file, indent=2)
        file.write("\n")
    paths["png"] = plot_ratios(rows, os.path.join(out_dir, "ratios.png"))
    return {"rows": rows, "paths": paths}
