"""report.json, report.md and PNG plots of an analysis, written atomically.

Everything is written into a temporary directory next to ``DIR`` first; then the
files are moved into ``DIR`` (created if needed) with ``report.json`` last, so a
``report.json`` present means the report is complete and nothing is half-written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Dict, List, Optional

from mergekit_rlvr.analysis.breakdown_plots import PLOTS as BREAKDOWN_PLOTS
from mergekit_rlvr.analysis.breakdown_plots import plot_breakdowns

PLOTS = {
    "layer_norms.png": "layer L2 norm of each task vector",
    "sign_conflict_by_density.png": "sign conflict against the kept share (global top-k)",
    "regions.png": "overlap / conflict / private / unchanged shares per pair",
    "module_shares.png": "share of each module kind in the global top entries",
    **BREAKDOWN_PLOTS,
}


def _clean(value):
    """JSON without NaN/Infinity: non-finite numbers become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _pct(x: Optional[float], digits: int = 0) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _label(arg: str) -> str:
    return os.path.basename(os.path.normpath(arg)) or arg


def _times(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def findings(report: dict) -> List[str]:
    """Sentences a user can act on, one finding each."""
    lines = _vector_findings(report) + _pair_findings(report)
    if report["skipped"]:
        tensors = sorted({s_["tensor"] for s_ in report["skipped"]})
        lines.append(f"{len(tensors)} tensor(s) were skipped (listed with reasons under \"skipped\" in report.json), "
                     f"e.g. {tensors[0]}: {report['skipped'][0]['reason']}.")
    return lines


def _vector_findings(report: dict) -> List[str]:
    lines: List[str] = []
    s = report["settings"]
    top = s["top"]
    for arg, v in report["vectors"].items():
        name = _label(arg)
        if not v["l2_norm"]:
            lines.append(f"Delta_{name} is zero: {arg} equals the base on every analyzed tensor; "
                         "merging it changes nothing.")
            continue
        layers = v["layer_l2_norms"]
        sentence = (f"Delta_{name} has L2 norm {v['l2_norm']:.4g}; {_pct(1 - v['sparsity'], 1)} of its entries are "
                    f"updated (|Delta| > {s['epsilon']:g}, sparsity {_pct(v['sparsity'], 1)})")
        if layers:
            peak = max(layers, key=layers.get)
            sentence += f"; layer {peak} changes most (norm {layers[peak]:.4g})"
        lines.append(sentence + ".")
        shares = v["module_top_share"]
        if shares:
            ranked = sorted(shares, key=shares.get, reverse=True)
            described = ", ".join(f"{k} {_pct(shares[k], 1)}" for k in ranked)
            lines.append(f"Of each module kind's parameters, this share is among Delta_{name}'s top "
                         f"{_pct(top)}: {described}.")
        if v["sparsity"] > 0.5:
            lines.append(f"Delta_{name} is sparse (RLVR-like): dense merges that average it with other vectors "
                         "dilute it; prefer sar (sparsity-preserving) or keep its coefficient near 1.")
    return lines


def _pair_findings(report: dict) -> List[str]:
    lines: List[str] = []
    s = report["settings"]
    for p in report["pairs"]:
        a, b = _label(p["a"]), _label(p["b"])
        ratio = p["norm_ratio"]
        parts = []
        if ratio:
            big, small, r = (a, b, ratio) if ratio >= 1 else (b, a, 1 / ratio)
            parts.append(f"Delta_{big} is {_times(r)} larger than Delta_{small}")
        by = p["sign_conflict_by_density"]
        low = by.get(str(min(s["densities"])))
        if p["sign_conflict"] is not None:
            text = f"{_pct(p['sign_conflict'])} of co-updated entries conflict in sign"
            if low is not None:
                text += f", {_pct(low)} after keeping the top {_pct(min(s['densities']))} of each"
            parts.append(text)
        else:
            parts.append("no entry is updated by both")
        advice = _pair_advice(p, report["vectors"], ratio, low)
        lines.append("; ".join(parts) + (f": {advice}" if advice else "") + ".")
        r = p["regions"]
        lines.append(f"{a} & {b}: overlap {_pct(r['overlap'], 2)} (conflict {_pct(r['conflict'], 2)}), "
                     f"private {_pct(r['private'], 2)}, unchanged {_pct(r['unchanged'], 2)} of all entries; "
                     f"cosine {p['cosine']:.3g}" if p["cosine"] is not None else
                     f"{a} & {b}: overlap {_pct(r['overlap'], 2)}, private {_pct(r['private'], 2)}.")
        if p["jaccard"] is not None and p["jaccard_random"]:
            factor = p["jaccard"] / p["jaccard_random"]
            lines.append(f"Changed-weight masks (eta {s['eta']:g}) of {a} and {b} have Jaccard {p['jaccard']:.3f}, "
                         f"{factor:.2f}x that of random masks of the same densities ({p['jaccard_random']:.3f})"
                         + ("; the updates share a footprint." if factor > 1.2 else
                            "; the footprints are as unrelated as random ones."))
    for p in report["pairs"]:
        by_type = {t: j for t, j in (p.get("jaccard_by_type") or {}).items() if j is not None}
        if by_type:
            lo, hi = min(by_type, key=by_type.get), max(by_type, key=by_type.get)
            cos = p.get("overlap_cosine")
            lines.append(f"Per matrix type, the changed-mask Jaccard of {_label(p['a'])} and {_label(p['b'])} ranges "
                         f"from {by_type[lo]:.3f} ({lo}) to {by_type[hi]:.3f} ({hi})"
                         + (f"; on the entries both changed, the updates have cosine {cos:.3g}." if cos is not None
                            else "."))
    return lines


def _pair_advice(p: dict, vectors: dict, ratio: Optional[float], low: Optional[float]) -> str:
    full = p["sign_conflict"]
    sparse = [vectors[p[k]]["sparsity"] > 0.5 for k in ("a", "b")]
    if ratio and max(ratio, 1 / ratio) >= 5 and full is not None and low is not None and low < 0.75 * full:
        return "dots with density 0.1 to 0.3 suits this pair (sparsify, rescale, search both coefficients)"
    if all(sparse) and p["regions"]["conflict"] > 0:
        return ("sar suits this pair (both updates are sparse; resolve the conflict region with a Fisher "
                "from `mergekit-rlvr fisher`)")
    if full is not None and full > 0.4:
        return "sign conflicts are frequent: prefer dots or sar over plain averaging"
    if p["cosine"] is not None and p["cosine"] > 0.5:
        return "the updates are aligned: linear interpolation (reasoning_interp) is safe"
    return ""


def markdown(report: dict) -> str:
    lines = [f"# Task-vector analysis of {', '.join(_label(m) for m in report['models'])} "
             f"against {_label(report['base'])}", ""]
    lines += [f"- {sentence}" for sentence in findings(report)]
    lines += ["", f"{report['tensors']} tensors, {report['parameters']:,} parameters per model analyzed. "
              "Figures and definitions: report.json; plots: " + ", ".join(PLOTS) + ".", ""]
    if report["pairs"]:
        densities = report["settings"]["densities"]
        lines += ["| pair | " + " | ".join(f"top {d:g}" for d in densities) + " |",
                  "|---" * (len(densities) + 1) + "|"]
        for p in report["pairs"]:
            cells = [_pct(p["sign_conflict_by_density"][str(d)], 1) for d in densities]
            lines.append(f"| {_label(p['a'])} & {_label(p['b'])} | " + " | ".join(cells) + " |")
        lines += ["", "Sign conflict among entries kept in both top-k sets (global top-k by |Delta|) and updated "
                  "in both.", ""]
    return "\n".join(lines)


def plot(report: dict, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for arg, v in report["vectors"].items():
        layers = sorted(v["layer_l2_norms"], key=int)
        ax.plot([int(x) for x in layers], [v["layer_l2_norms"][x] for x in layers], marker="o", label=_label(arg))
    ax.set_yscale("log")
    ax.set(xlabel="layer", ylabel="L2 norm of Delta", title="Layer norms")
    ax.legend()
    save(fig, "layer_norms.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in report["pairs"]:
        xs = report["settings"]["densities"]
        ys = [p["sign_conflict_by_density"][str(d)] for d in xs]
        ax.plot(xs, [float("nan") if y is None else 100 * y for y in ys], marker="o",
                label=f"{_label(p['a'])} & {_label(p['b'])}")
    ax.set(xlabel="kept share (global top k of each vector)", ylabel="sign conflict among co-updated (%)",
           title="Sign conflict by density")
    ax.set_ylim(bottom=0)
    if report["pairs"]:
        ax.legend()
    save(fig, "sign_conflict_by_density.png")

    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * max(1, len(report["pairs"]))))
    names = [f"{_label(p['a'])} & {_label(p['b'])}" for p in report["pairs"]]
    left = [0.0] * len(names)
    for key, color in (("conflict", "tab:red"), ("agree", "tab:orange"), ("private", "tab:blue"),
                       ("unchanged", "lightgray")):
        r = [p["regions"] for p in report["pairs"]]
        widths = [100 * (x["overlap"] - x["conflict"]) if key == "agree" else 100 * x[key] for x in r]
        ax.barh(names, widths, left=left, color=color, label="overlap, same sign" if key == "agree" else key)
        left = [l_ + w for l_, w in zip(left, widths)]
    ax.set(xlabel="share of all entries (%)", title="Update regions")
    if names:
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, "regions.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    kinds = [k for k in ("attention", "mlp", "norm", "embedding", "lm_head", "other")
             if any(k in v["module_top_share"] for v in report["vectors"].values())]
    width = 0.8 / max(1, len(report["vectors"]))
    for i, (arg, v) in enumerate(report["vectors"].items()):
        ax.bar([x + i * width for x in range(len(kinds))], [100 * v["module_top_share"].get(k, 0) for k in kinds],
               width=width, label=_label(arg))
    ax.set_xticks([x + width * (len(report["vectors"]) - 1) / 2 for x in range(len(kinds))], kinds)
    ax.set(ylabel=f"% of the module's parameters in the top {100 * report['settings']['top']:g}%",
           title="Module shares of the top entries")
    ax.legend()
    save(fig, "module_shares.png")
    plot_breakdowns(report, save, plt)


def write_report(report: dict, out_dir: str) -> Dict[str, str]:
    """Write report.json, report.md and the plots into ``out_dir``; returns name -> path."""
    report = _clean(report)
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".analyze-", dir=parent)
    try:
        plot(report, tmp)
        with open(os.path.join(tmp, "report.md"), "w") as handle:
            handle.write(markdown(report))
        with open(os.path.join(tmp, "report.json"), "w") as handle:
            json.dump(report, handle, indent=2)
        os.makedirs(out_dir, exist_ok=True)
        written = {}
        for name in [*PLOTS, "report.md", "report.json"]:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
            written[name] = os.path.join(out_dir, name)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
