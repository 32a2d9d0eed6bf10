"""PNG plots of a pruning run: expected shape against the target, and the Lagrange multipliers."""
from __future__ import annotations

import os

from llmshearing.io import read_jsonl


def plot_pruning_log(log_file: str, out_dir: str, source: dict, target: dict, warmup: int = 0,
                     settle: dict | None = None) -> list[str]:
    """pruning_shape.png: each pruned structure's expected size against its target (dashed: the ramped target the
    Lagrangian pulls towards), the cut (the export) marked, and whether the masks had settled there
    (callbacks.pruning_log.settling); pruning_lambdas.png: the multipliers."""
    import matplotlib  # heavy: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    rows = read_jsonl(log_file, last_per="step")
    if not rows:
        return []
    steps = [r["step"] for r in rows]

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, color in zip(source, ("C0", "C1", "C2", "C3", "C4")):
        if source[key] == target[key]:
            continue
        ax.plot(steps, [r[f"expected/{key}"] / source[key] for r in rows], color=color, label=key)
        ramp = [min(1.0, st / warmup) if warmup > 0 else 1.0 for st in steps]
        ax.plot(steps, [1 - (1 - target[key] / source[key]) * f for f in ramp], color=color, ls="--", lw=0.8)
    ax.axvline(steps[-1], color="k", lw=0.8)
    ax.text(steps[-1], 0.98, "cut ", transform=ax.get_xaxis_transform(), ha="right", va="top", fontsize=8)
    status = "" if settle is None else (" - settled at the cut" if settle["settled"] else " - NOT settled at the cut")
    ax.set(xlabel="step", ylabel="expected size / source size", title=f"Expected shape vs target (dashed){status}")
    ax.legend(fontsize=8)
    shape_png = os.path.join(out_dir, "pruning_shape.png")
    fig.tight_layout()
    fig.savefig(shape_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted(k for k in rows[-1] if k.startswith("l0/") and "/lambda_" in k):
        ax.plot(steps, [r[key] for r in rows], label=key[3:])
    ax.set(xlabel="step", ylabel="value", title="Lagrange multipliers")
    ax.legend(fontsize=7, ncol=2)
    lambda_png = os.path.join(out_dir, "pruning_lambdas.png")
    fig.tight_layout()
    fig.savefig(lambda_png, dpi=110)
    plt.close(fig)
    return [shape_png, lambda_png]


def plot_domain_log(log_file: str, out_dir: str) -> list[str]:
    """domain_weights.png (weights per domain over training) and, with dynamic loading,
    domain_gaps.png (eval loss minus reference per domain) from DynamicLoading's jsonl."""
    import matplotlib  # heavy: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    rows = read_jsonl(log_file, last_per="batch")
    if not rows:
        return []
    domains, batches = rows[-1]["domains"], [r["batch"] for r in rows]
    out = []
    panels = [("weights", "domain weight", "Domain weights (set after each eval)", "domain_weights.png"),
              ("gaps", "eval loss - reference", "Per-domain loss gap", "domain_gaps.png")]
    for key, ylabel, title, name in panels:
        if any(r[key] is None for r in rows):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, d in enumerate(domains):
            ax.plot(batches, [r[key][i] for r in rows], marker="o", ms=3, label=d)
        if key == "gaps":
            ax.axhline(0, color="k", lw=0.8)
        ax.set(xlabel="batch", ylabel=ylabel, title=title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out.append(os.path.join(out_dir, name))
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)
    return out
