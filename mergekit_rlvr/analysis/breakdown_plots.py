"""PNG plots of the per matrix type / per layer breakdowns (``analysis.breakdown``)."""

from __future__ import annotations

import os

PLOTS = {
    "jaccard_by_type.png": "Jaccard of changed-weight masks per matrix type, with the random baseline (paper 004 Table 5)",
    "jaccard_by_layer.png": "Jaccard of changed-weight masks per layer, with the random baseline",
    "overlap_cosine.png": "cosine of the updates on the overlap region per matrix type (paper 004 Fig. 3)",
    "layer_sparsity.png": "update sparsity per layer (paper 001 Fig. 2)",
}


def _label(arg: str) -> str:
    return os.path.basename(os.path.normpath(arg)) or arg


def _nan(value):
    return float("nan") if value is None else value


def plot_breakdowns(report: dict, save, plt) -> None:
    pairs = report["pairs"]
    names = [f"{_label(p['a'])} & {_label(p['b'])}" for p in pairs]

    for key, ylabel, title, out in (
        ("jaccard_by_type", "Jaccard of changed masks", "Changed-weight overlap per matrix type", "jaccard_by_type.png"),
        ("overlap_cosine_by_type", "cosine on the overlap", "Update cosine on the overlap region", "overlap_cosine.png"),
    ):
        types = sorted({t for p in pairs for t in p[key]})
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(types) + 2), 4))
        width = 0.8 / max(1, len(pairs))
        for i, (p, name) in enumerate(zip(pairs, names)):
            xs = [x + i * width for x in range(len(types))]
            ax.bar(xs, [_nan(p[key].get(t)) for t in types], width=width, label=name)
            if key == "jaccard_by_type":  # the random baseline of the same densities, as a black tick
                ax.scatter(xs, [_nan(p["jaccard_random_by_type"].get(t)) for t in types], marker="_",
                           s=max(40, 300 * width), color="k", linewidths=2, zorder=3,
                           label="random masks, same densities" if i == 0 else None)
        ax.set_xticks([x + width * (len(pairs) - 1) / 2 for x in range(len(types))], types, rotation=45, ha="right")
        ax.set(ylabel=ylabel, title=title)
        if pairs:
            ax.legend(fontsize="small")
        save(fig, out)

    fig, ax = plt.subplots(figsize=(6, 4))
    for p, name in zip(pairs, names):
        layers = sorted(p["jaccard_by_layer"], key=int)
        line, = ax.plot([int(L) for L in layers], [_nan(p["jaccard_by_layer"][L]) for L in layers], marker="o",
                        label=name)
        ax.plot([int(L) for L in layers], [_nan(p["jaccard_random_by_layer"][L]) for L in layers], ls="--",
                color=line.get_color(), label=f"{name} (random masks)")
    ax.set(xlabel="layer", ylabel="Jaccard of changed masks", title="Changed-weight overlap per layer")
    if pairs:
        ax.legend(fontsize="small")
    save(fig, "jaccard_by_layer.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for arg, v in report["vectors"].items():
        layers = sorted(v.get("layer_sparsity", {}), key=int)
        ax.plot([int(L) for L in layers], [100 * v["layer_sparsity"][L] for L in layers], marker="o",
                label=_label(arg))
    ax.set(xlabel="layer", ylabel=f"entries with |Delta| <= {report['settings']['epsilon']:g} (%)",
           title="Update sparsity per layer")
    ax.legend()
    save(fig, "layer_sparsity.png")
