"""Records the expected shape, sparsities and multipliers of the masks every batch, plots them at the end, and says
whether the masks had settled on the target by the cut."""
from __future__ import annotations

import json
import os
import sys

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmshearing.pruning.shapes import param_count, SHAPE_KEYS
from llmshearing.compat import unwrap
from llmshearing.io import append_jsonl, atomic_write_text, read_jsonl, truncate_jsonl
from llmshearing.plots import plot_pruning_log

SETTLE_TOLERANCE = 0.01  # |expected - target| / target per structure (issue 25's criterion)
SETTLE_WINDOW = 0.1  # the share of the pruning steps before the cut (at least one step) that must all be in tolerance
SETTLE_FILE = "masks_at_cut.json"
DECIDED_GATE = 0.9  # the kept units' median test-time gate, per mask, at or above which the masks have decided


def kept_gates(l0) -> dict[str, float]:
    """Per mask, the median test-time gate of the units the export keeps (folded into their weights): ~1 when the
    masks have decided, ~0.5 when they hold the target count with half-open gates (docs/convergence.md round 5)."""
    gates = {}
    with torch.no_grad():
        for name, mask in l0.masks.items():
            value = mask.deterministic()
            gates[name] = float(value[value > 0].median())
    return gates


def decided_line(gates: dict[str, float]) -> str | None:
    """A warning when some mask's kept units are still far from open (None when every median is >= DECIDED_GATE)."""
    low = {n: g for n, g in gates.items() if g < DECIDED_GATE}
    if not low:
        return None
    return ("warning: the masks had NOT decided at the cut: the kept units' median test-time gate is "
            + ", ".join(f"{g:.2f} ({n})" for n, g in low.items())
            + f" (below {DECIDED_GATE}); the export folds these scales into the weights (docs/convergence.md round 5)")


def settling(rows: list[dict], source: dict, target: dict, warmup: int, tol: float = SETTLE_TOLERANCE) -> dict:
    """Had the masks settled at the cut? Per pruned structure, the largest |expected - target| / target over the
    last SETTLE_WINDOW of the logged steps (`rows`, PruningLog's); settled when every one is within `tol` and the
    target ramp (`warmup` steps) had ended by the window's first step."""
    steps = [r["step"] for r in rows]
    window = [r for r in rows if r["step"] >= steps[-1] + 1 - max(1, round(SETTLE_WINDOW * len(rows)))]
    keys = [k for k in target if source[k] != target[k]]
    deviation = {k: max(abs(r[f"expected/{k}"] - target[k]) / target[k] for r in window) for k in keys}
    return {"settled": all(d <= tol for d in deviation.values()) and window[0]["step"] >= warmup,
            "tolerance": tol, "window": [window[0]["step"], window[-1]["step"]], "warmup": warmup,
            "deviation": deviation, "expected_at_cut": {k: rows[-1][f"expected/{k}"] for k in keys},
            "target": {k: target[k] for k in keys}}


def settle_line(s: dict) -> str:
    """One line for the end of pruning and the demo's summary."""
    span = f"steps {s['window'][0]}-{s['window'][1]}"
    if s["settled"]:
        return (f"masks settled at the cut: the expected shape stayed within {s['tolerance']:.0%} of the target "
                f"per structure over {span}")
    off = ", ".join(f"{k} {s['expected_at_cut'][k]:.1f} vs {s['target'][k]} (off by up to {s['deviation'][k]:.1%})"
                    for k in s["deviation"] if s["deviation"][k] > s["tolerance"])
    ramp = f"; the target ramp ({s['warmup']} steps) had not ended" if s["window"][0] < s["warmup"] else ""
    return (f"warning: the masks had NOT settled at the cut ({span}: {off or 'within tolerance'}{ramp}); the export "
            f"cut them to the target anyway (docs/convergence.md)")


class PruningLog(Callback):
    """Every batch: logs expected layers/heads/kv heads/intermediate/hidden/parameters, the expected and
    target sparsity and both multipliers of every mask; appends them and the batch's losses to
    `<folder>/pruning_log.jsonl`
    and, at the end of training, draws them in `<folder>/pruning_shape.png` and `pruning_lambdas.png`.
    """

    def __init__(self, folder: str | None = None):
        self.folder = folder

    def fit_start(self, state: State, logger: Logger) -> None:
        resumed = int(state.timestamp.batch)
        if self.folder and dist.get_global_rank() == 0:  # drop rows an interrupted run wrote after the checkpoint
            truncate_jsonl(os.path.join(self.folder, "pruning_log.jsonl"), lambda row: row["step"] < resumed)

    def batch_end(self, state: State, logger: Logger) -> None:
        model = unwrap(state.model)
        l0 = model.l0
        _, metrics = l0.lagrangian()
        expected = l0.expected_shape()
        metrics.update({f"expected/{k}": v for k, v in expected.items()})
        metrics["expected/params"] = param_count(l0.target, model.model.config, floats=expected)
        logger.log_metrics(metrics)
        if self.folder and dist.get_global_rank() == 0:  # the batch's losses, averaged over ranks by Composer
            losses = {k: float(v) for k, v in (state.total_loss_dict or {}).items()}
            append_jsonl(os.path.join(self.folder, "pruning_log.jsonl"), {"step": l0.step, **losses, **metrics})

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.folder and dist.get_global_rank() == 0:
            l0 = unwrap(state.model).l0
            source = {k: getattr(l0.source, k) for k in SHAPE_KEYS}
            target = {k: getattr(l0.target, k) for k in SHAPE_KEYS}
            log_file = os.path.join(self.folder, "pruning_log.jsonl")
            rows = read_jsonl(log_file, last_per="step")
            settle = settling(rows, source, target, l0.warmup_steps) if rows else None
            if settle is not None:
                settle["kept_gate_median"] = kept_gates(l0)
                undecided = decided_line(settle["kept_gate_median"])
                settle["decided"] = undecided is None
                if undecided:
                    print(undecided, file=sys.stderr, flush=True)
                atomic_write_text(os.path.join(self.folder, SETTLE_FILE), json.dumps(settle, indent=1))
                print(settle_line(settle), file=sys.stdout if settle["settled"] else sys.stderr, flush=True)
            plot_pruning_log(log_file, self.folder, source=source, target=target, warmup=l0.warmup_steps,
                             settle=settle)
