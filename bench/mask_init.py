"""How `pruning.init: activation` maps activation scores to log_alpha: candidate maps compared from the same scores
(16 calibration sequences of the prune split, as the oneshot_act arm) on SmolLM2-135M -> smollm2-135m-half.
The numbers and the choice are in docs/fidelity.md ("Importance-initialised masks").

    python -m bench.mask_init                  # step 0 only: a few minutes on 2 CPU cores
    python -m bench.mask_init --steps 40       # + 40 pruning steps per map (reproduce-mini's pruning stage)

Per map, at step 0: the expected shape (L0Module.expected_shape); the masked LM loss on eval sequences with the
gates sampled as training samples them (mean of --draws draws), in eval mode at the expected size (what evals
during pruning report) and at the target cut (what an export would give); and, for kept / dropped units, the
share of gate draws strictly between 0 and 1 (only there does the LM loss reach log_alpha through the
hard-concrete sample). With --steps: masks and weights trained together (mask and multiplier lr 0.3, weights 1e-4,
Lagrangian warm-up --warmup) on prune-split sequences after the calibration ones, then the expected shape, the
loss at the target cut, and how much of the one-shot keep set the cut still keeps.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from llmshearing.data.layout import DomainSequences, read_manifest
from llmshearing.train.composer_model import ComposerLM
from llmshearing.model.hf import load_hf_config
from llmshearing.model.loading import from_pretrained
from llmshearing.pruning.export import kept_units
from llmshearing.pruning.masks import LIMIT_LEFT, LIMIT_RIGHT, LOG_ALPHA_RANGE, TEMPERATURE, L0Module, init_bands
from llmshearing.pruning.oneshot import activation_scores, calibration_ids, set_scores
from llmshearing.pruning.shapes import shape_of
from llmshearing.pruning.target import resolve_target

LOW, HIGH = LOG_ALPHA_RANGE
# P(z > 0) = sigmoid(a - STRETCH) and P(z = 1) = sigmoid(a + STRETCH) for log_alpha a
STRETCH = TEMPERATURE * math.log(-LIMIT_LEFT / LIMIT_RIGHT)


def tanh_map(l0: L0Module, scores: dict) -> None:
    """Score-normalised: log_alpha = (HIGH - 0.01) tanh((log s - log t) / sd(log s)) per row, t between the k-th and
    (k+1)-th score: the boundary units start undecided, clear winners and losers near the clamp ends."""
    for name, mask in l0.masks.items():
        s = scores[name].float().clamp_min(1e-12).log()
        top = s.sort(-1, descending=True).values
        t = (top[..., mask.keep - 1] + top[..., mask.keep]).unsqueeze(-1) / 2
        mask.log_alpha.data.copy_((HIGH - 0.01) * torch.tanh((s - t) / s.std(-1, keepdim=True).clamp_min(1e-6)))


def candidates() -> dict:
    """name -> None (the released code's uniform init), (kept band, dropped band), or a function of (l0, scores)."""
    return {"uniform": None,
            "open: kept [3.6, 4.6], dropped [2.1, 3.1]": ((HIGH - 1, HIGH), (HIGH - 2.5, HIGH - 1.5)),
            "middle: kept [3.6, 4.6], dropped [-2.6, -0.6]": ((HIGH - 1, HIGH), (-2.6, -0.6)),
            "split (chosen): kept [3.6, 4.6], dropped [-4.6, -3.6]": init_bands(LOG_ALPHA_RANGE),
            "score-normalised (tanh)": tanh_map}


@torch.no_grad()
def lm_loss(model: ComposerLM, ids: torch.Tensor) -> float:
    batch = {"input_ids": ids, "labels": ids}
    loss = model.loss(model(batch), batch)
    return float(loss["lm"] if isinstance(loss, dict) else loss)


def gradient_share(l0: L0Module) -> tuple[float, float]:
    """Mean P(0 < z < 1) over the kept and over the dropped units of every mask (kept: the current top-k)."""
    kept, dropped = [], []
    for mask in l0.masks.values():
        a = mask.log_alpha.detach().clamp(LOW, HIGH)
        share = torch.sigmoid(a - STRETCH) - torch.sigmoid(a + STRETCH)
        top = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, mask.keep_index(), True)
        kept.append(share[top]), dropped.append(share[~top])
    return float(torch.cat(kept).mean()), float(torch.cat(dropped).mean())


def overlap(a: dict, b: dict) -> float:
    """Share of the units kept in `b` (one-shot) that `a` keeps too, over layers, hidden dims and per-layer units."""
    same = total = 0
    for key in ("layers", "hidden"):
        same, total = same + len(set(a[key]) & set(b[key])), total + len(b[key])
    for key in ("heads", "intermediate"):  # per source layer, where both keep the layer
        for la, ua in zip(a["layers"], a[key]):
            if la in b["layers"]:
                ub = b[key][b["layers"].index(la)]
                same, total = same + len(set(ua) & set(ub)), total + len(ub)
    return same / total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="data/models/smollm2-135m")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--target", default="smollm2-135m-half", help="a preset, config path or json dims")
    p.add_argument("--calibration", type=int, default=4, help="calibration sequences per domain (prune split)")
    p.add_argument("--eval-sequences", type=int, default=4, help="eval sequences per domain")
    p.add_argument("--draws", type=int, default=2, help="mask draws for the training-mode loss")
    p.add_argument("--steps", type=int, default=0, help="pruning steps per map after step 0 (0: none)")
    p.add_argument("--warmup", type=int, default=16, help="Lagrangian warm-up (batches) of those steps")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--maps", nargs="*", default=None, help="only the maps whose names start with these words")
    p.add_argument("--out", default=None, help="also write the rows here (json)")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    domains = list(read_manifest(a.shards)["domains"])
    config = load_hf_config(a.model)
    spec = json.loads(a.target) if a.target.startswith("{") else a.target
    source, target = shape_of(config), resolve_target(spec, config)
    cal = calibration_ids(a.shards, domains, a.calibration)
    evals = torch.stack([DomainSequences(a.shards, d, "eval", a.eval_sequences)[i]["input_ids"]
                         for d in domains for i in range(a.eval_sequences)])
    train = [DomainSequences(a.shards, d, "prune") for d in domains]
    scores = activation_scores(from_pretrained(a.model, attn_impl="sdpa"), cal)
    oneshot = L0Module(source, target, log_alpha_range=None)
    set_scores(oneshot, scores)
    chosen = kept_units(oneshot)
    dense = lm_loss(ComposerLM(from_pretrained(a.model, attn_impl="sdpa").eval()), evals)
    with oneshot.target_masks():
        cut = lm_loss(ComposerLM(from_pretrained(a.model, attn_impl="sdpa"), oneshot), evals)
    rows = [{"map": "source (dense)", "loss_eval": dense}, {"map": "one-shot cut (gate values 1)", "loss_cut": cut}]
    print(f"calibration: {cal.shape[0]} x {cal.shape[1]} tokens; eval: {evals.shape[0]} x {evals.shape[1]}; "
          f"dense loss {dense:.4f}, one-shot cut {cut:.4f}", flush=True)
    for name, spec in candidates().items():
        if a.maps and not any(name.startswith(m) for m in a.maps):
            continue
        start = time.time()
        l0 = L0Module(source, target, warmup_steps=a.warmup, seed=a.seed)
        if callable(spec):
            spec(l0, scores)
        elif spec is not None:
            set_scores(l0, scores, *spec)
        model = ComposerLM(from_pretrained(a.model, attn_impl="sdpa"), l0)
        l0.constrain()
        row = {"map": name, "expected_step0": l0.expected_shape(), "grad_share_kept_dropped": gradient_share(l0)}
        model.train()
        draws = []
        for step in range(a.draws):  # the draws of steps 0, 1, ... (the noise is keyed by the step)
            l0.step = step
            draws.append(lm_loss(model, evals))
        l0.step = 0
        model.eval()
        row.update(loss_train_mode=sum(draws) / len(draws), loss_eval=lm_loss(model, evals))
        with l0.target_masks():
            row["loss_cut"] = lm_loss(model, evals)
        row["keeps_oneshot"] = overlap(kept_units(l0), chosen)
        if a.steps:
            model.train()
            opt = torch.optim.AdamW(model.param_groups(1e-4, 0.0, 0.3, 0.3), betas=(0.9, 0.95))
            for step in range(a.steps):
                l0.step = step
                ids = torch.stack([train[(a.batch * step + j) % len(train)][a.calibration + step]["input_ids"]
                                   for j in range(a.batch)])
                model.loss(model({"input_ids": ids}), {"labels": ids})["total"].backward()
                opt.step()
                opt.zero_grad()
            model.eval()
            with l0.target_masks():
                row[f"loss_cut_after_{a.steps}"] = lm_loss(model, evals)
            row.update({f"expected_after_{a.steps}": l0.expected_shape(),
                        f"keeps_oneshot_after_{a.steps}": overlap(kept_units(l0), chosen)})
        row["seconds"] = round(time.time() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
