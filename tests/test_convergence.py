"""Do the masks hold the target at the cut? The settle check (callbacks.pruning_log.settling), its line at the end of
pruning, the plain-gradient multipliers (`pruning.lambda_optimizer: sgd`), and real tiny runs on each side."""
import json
import math
import os
import sys

import pytest
import torch
from conftest import TINY_YAML, paths, run

from llmshearing.callbacks.pruning_log import SETTLE_FILE, settle_line, settling
from llmshearing.train.builders import PlainGroupsAdamW

SOURCE = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536}
TARGET = {"num_hidden_layers": 24, "hidden_size": 576, "intermediate_size": 1152}


def rows(layers, intermediate):
    return [{"step": i, "expected/num_hidden_layers": a, "expected/hidden_size": 576.0, "expected/intermediate_size": b}
            for i, (a, b) in enumerate(zip(layers, intermediate))]


def test_settled_means_every_pruned_structure_within_one_percent_over_the_last_tenth():
    # 20 steps: the window is the last 2; hidden is not pruned, so it is not judged
    log = rows([28.0] * 18 + [24.2, 23.8], [1300.0] * 18 + [1160.0, 1150.0])
    s = settling(log, SOURCE, TARGET, warmup=0)
    assert s["settled"] and s["window"] == [18, 19] and set(s["deviation"]) == {"num_hidden_layers", "intermediate_size"}
    assert s["deviation"]["num_hidden_layers"] == pytest.approx(0.2 / 24)  # max of 0.2 and 0.2 layers off
    assert s["deviation"]["intermediate_size"] == pytest.approx(8 / 1152)
    assert "NOT" not in settle_line(s) and "within 1%" in settle_line(s)


def test_a_structure_off_by_more_than_one_percent_in_the_window_is_not_settled():
    log = rows([24.0] * 19 + [28.8], [1152.0] * 20)  # the demo's layer count at the cut (issue 25)
    s = settling(log, SOURCE, TARGET, warmup=0)
    assert not s["settled"] and s["deviation"]["num_hidden_layers"] == pytest.approx(0.2)
    line = settle_line(s)
    assert line.startswith("warning: the masks had NOT settled at the cut") and "num_hidden_layers 28.8 vs 24" in line
    assert "intermediate_size" not in line  # only what is off is named


def test_a_window_that_starts_inside_the_target_ramp_is_not_settled():
    log = rows([24.0] * 20, [1152.0] * 20)
    s = settling(log, SOURCE, TARGET, warmup=19)
    assert not s["settled"] and "target ramp (19 steps) had not ended" in settle_line(s)


def test_plain_multiplier_steps_are_proportional_to_the_gradient_and_adam_steps_are_not():
    """lambda_optimizer=sgd: lambda moves by lr x gradient (a tiny gap, a tiny step); AdamW's first step is ~lr
    whatever the gradient's size, which is what winds the multipliers up at full speed (docs/convergence.md)."""
    lam, w = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = PlainGroupsAdamW([{"params": [w], "lr": 0.1}, {"params": [lam], "lr": 10.0, "plain": True}], lr=0.1)
    lam.grad, w.grad = torch.tensor([1e-3, -2e-2]), torch.tensor([1e-3, -2e-2])
    opt.step()
    assert lam.tolist() == pytest.approx([-1e-2, 0.2])
    assert w.tolist() == pytest.approx([-0.1, 0.1], rel=1e-4)  # Adam: sign times lr on the first step
    assert opt.state_dict()["param_groups"][1]["plain"]
    assert opt.state[lam] == {"step": torch.tensor(1.0)}  # a step count (checkpoints need a state), no Adam moments


def test_mask_beta1_and_eps_change_the_masks_group_only(tiny_setup, tmp_path):
    """`pruning.mask_beta1=0` / `mask_eps=1e-3`: the mask log-alphas' group steps without momentum and with that eps;
    weights and multipliers keep optimizer.betas and eps, and the optimizer is still torch's AdamW (its class name
    keys checkpoints)."""
    from llmshearing.train.builders import build_model, build_optimizer
    from llmshearing.train.config import load_config

    cfg = load_config(TINY_YAML, [*paths(tiny_setup, str(tmp_path / "run")), "pruning.mask_beta1=0",
                                  "pruning.mask_eps=1e-3"])
    model = build_model(cfg, load_weights=False)
    opt = build_optimizer(cfg, model)
    assert type(opt) is torch.optim.AdamW
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.95), (0.0, 0.95), (0.9, 0.95)]
    assert [g["eps"] for g in opt.param_groups] == [1e-8, 1e-3, 1e-8]
    assert opt.param_groups[1]["params"] == [m.log_alpha for m in model.l0.masks.values()]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unsettled", "settled"])
def test_a_run_says_at_the_end_of_pruning_whether_its_masks_settled(tiny_setup, tmp_path, case):
    """unsettled: dense masks asked for 1 of 4 layers and a quarter of the hidden size with no ramp and 4 steps;
    settled: activation-initialised masks asked for one intermediate unit fewer per layer, 96 -> 95 (they start there)."""
    folder = str(tmp_path / case)
    target = (["pruning.target={num_hidden_layers: 1, hidden_size: 16}", "pruning.init_drop=null"]
              if case == "unsettled" else
              ["pruning.target={intermediate_size: 95}", "pruning.init=activation", "pruning.init_sequences=2"])
    proc = run([sys.executable, "train.py", TINY_YAML, *paths(tiny_setup, folder), *target, "max_duration=4ba",
                "pruning.lagrangian_warmup=0ba", "eval_interval=4ba", "save_interval=4ba", "data.num_workers=0"],
               timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(folder, SETTLE_FILE)) as f:
        s = json.load(f)
    assert s["window"] == [3, 3] and s["settled"] == (case == "settled")
    warned = "warning: the masks had NOT settled at the cut" in proc.stderr
    assert warned == (case == "unsettled"), proc.stderr[-2000:]
    if case == "settled":
        assert "masks settled at the cut" in proc.stdout
    else:
        assert "num_hidden_layers" in proc.stderr and "hidden_size" in proc.stderr
    assert os.path.exists(os.path.join(folder, "pruning_shape.png"))


def test_init_at_target_lowers_the_kept_units_until_each_row_expects_its_target():
    """`pruning.init_at_target`: the activation bands leave the dropped units at P(open) 0.047-0.12 (the clamp
    floor), so the expected shape starts above the target (SmolLM2 -> half: 4.28 heads for 4); the shift removes
    that gap without changing the keep set."""
    from llmshearing.pruning.masks import L0Module, init_bands
    from llmshearing.pruning.oneshot import set_scores
    from llmshearing.pruning.shapes import Shape

    l0 = L0Module(Shape(30, 576, 9, 3, 1536), Shape(24, 512, 4, 2, 1152))
    g = torch.Generator().manual_seed(0)
    set_scores(l0, {n: torch.rand(m.shape, generator=g) for n, m in l0.masks.items()}, *init_bands())
    assert l0.expected_shape()["num_attention_heads"] > 4.2
    keep = {n: m.keep_index().clone() for n, m in l0.masks.items()}
    dropped = {n: m.log_alpha[m.log_alpha < 0].clone() for n, m in l0.masks.items()}
    l0.lower_kept_to_target()
    for name, mask in l0.masks.items():
        assert torch.equal(mask.keep_index(), keep[name]), name
        assert torch.equal(mask.log_alpha[mask.log_alpha < 0], dropped[name]), name  # only kept units move
        torch.testing.assert_close(mask.score().sum(-1), torch.full(mask.shape[:-1], float(mask.keep)), atol=1e-3,
                                   rtol=0)
    shape = l0.expected_shape()
    for key, want in {"num_hidden_layers": 24, "hidden_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "intermediate_size": 1152}.items():
        assert shape[key] == pytest.approx(want, rel=1e-4), key


def test_a_fixed_penalty_replaces_the_learned_quadratic_multiplier():
    """`pruning.penalty: rho`: the loss is lambda_1 * gap + rho / 2 * gap^2 per row (the augmented Lagrangian),
    lambda_2 gets no gradient, and lambda_1 still gets the (reversed) gap."""
    from llmshearing.pruning.masks import L0Module
    from llmshearing.pruning.shapes import Shape

    l0 = L0Module(Shape(4, 8, 2, 2, 16), Shape(2, 8, 2, 2, 16), penalty=100.0)
    with torch.no_grad():
        l0.lambdas.fill_(0.5)
    gap = float(l0.masks["layer"].expected_sparsity_rows()) - 0.5  # no ramp: the target sparsity is 1 - 2 / 4
    loss, _ = l0.lagrangian()
    assert float(loss) == pytest.approx(0.5 * gap + 50.0 * gap**2, rel=1e-5)  # by hand
    loss.backward()
    assert float(l0.lambdas.grad[0, 1]) == 0.0 and float(l0.lambdas.grad[0, 0]) == pytest.approx(-gap, rel=1e-5)


def test_uniform_init_at_target_starts_every_gate_at_its_keep_fraction():
    """`pruning.init: uniform` + `init_at_target`: no unit is preferred (the init noise only), and every row expects
    exactly its target count (heads: the KV gate times the head gate, 9 x 2/3 x 2/3 = 4)."""
    from llmshearing.pruning.masks import L0Module
    from llmshearing.pruning.shapes import Shape

    l0 = L0Module(Shape(30, 576, 9, 3, 1536), Shape(24, 512, 4, 2, 1152), seed=3)
    assert l0.expected_shape()["num_attention_heads"] > 8.9  # the released start: every gate open
    l0.open_at_target()
    for name, mask in l0.masks.items():
        assert float(mask.log_alpha.std()) < 0.02, name  # the init noise, nothing else
        torch.testing.assert_close(mask.score().mean(-1), torch.full(mask.shape[:-1], mask.keep / mask.units),
                                   atol=0.01, rtol=0)
    shape = l0.expected_shape()
    for key, want in {"num_hidden_layers": 24, "hidden_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "intermediate_size": 1152}.items():
        assert shape[key] == pytest.approx(want, rel=0.01), key
    # log_alpha -0.21 for 24 of 30 layers: P(z > 0) = sigmoid(log_alpha - beta * ln(-l / r)) = 0.8 (by hand)
    assert float(l0.masks["layer"].log_alpha.mean()) == pytest.approx(math.log(4) + 2 / 3 * math.log(0.1 / 1.1), abs=1e-3)


def test_half_open_kept_gates_are_not_decided_and_open_ones_are():
    """The cut's second check: the expected count can sit on the target with every gate half open (what a fixed
    penalty did to the uniform init, docs/convergence.md round 5); the export would fold those scales in."""
    from llmshearing.callbacks.pruning_log import DECIDED_GATE, decided_line, kept_gates
    from llmshearing.pruning.masks import L0Module
    from llmshearing.pruning.shapes import Shape

    l0 = L0Module(Shape(30, 576, 9, 3, 1536), Shape(24, 512, 4, 2, 1152))
    l0.constrain()  # the released start, clamped to ln 100: every gate open
    assert min(kept_gates(l0).values()) > 0.99 and decided_line(kept_gates(l0)) is None
    l0.open_at_target()  # on the target in expectation, nothing decided
    gates = kept_gates(l0)
    assert max(gates.values()) < DECIDED_GATE
    # the head gates: log_alpha = logit(2/3) + 2/3 ln(1/11) = -0.905, test-time gate sigmoid(-0.905 / (2/3) * 0.8)
    assert gates["head"] == pytest.approx(1 / (1 + math.exp(0.905 / (2 / 3) * 0.8)), abs=0.01)
    assert "NOT decided" in decided_line(gates) and "(head)" in decided_line(gates)


def test_the_demo_summary_repeats_the_verdict():
    from llmshearing.experiments.demo import format_report

    summary = {"params": {"source": 2, "pruned": 1}, "source_shape": {}, "kept_shape": {},
               "perplexity": {"source": {"news": 1.0}}, "reference_losses": {"news": 1.0}, "final_domain_weights": {},
               "max_abs_logit_diff_masked_vs_export": 0.0, "seconds": {"total": 1.0}, "plots": []}
    unsettled = settling(rows([24.0] * 19 + [28.8], [1152.0] * 20), SOURCE, TARGET, warmup=0)
    settled = settling(rows([24.0] * 20, [1152.0] * 20), SOURCE, TARGET, warmup=0)
    assert "Pruning: warning: the masks had NOT settled at the cut" in format_report({**summary, "masks_at_cut": unsettled})
    half_open = {**settled, "kept_gate_median": {"layer": 0.99, "head": 0.61}, "decided": False}
    assert "Pruning: warning: the masks had NOT decided at the cut: the kept units' median test-time gate is 0.61 (head)" \
        in format_report({**summary, "masks_at_cut": half_open})
    report = format_report({**summary, "masks_at_cut": settled})
    assert "Pruning: masks settled at the cut" in report and "NOT" not in report


@pytest.mark.slow
def test_a_run_with_plain_gradient_multipliers_resumes_bit_identically(tiny_setup, tmp_path):
    """`pruning.lambda_optimizer: sgd` keeps no Adam state for the multipliers: a checkpoint must still load
    (it once failed with KeyError 'l0.lambdas') and the resumed run end with the uninterrupted one's weights."""
    held = ["pruning.lambda_optimizer=sgd", "pruning.lambda_lr=10", "pruning.mask_eps=1e-3", "max_duration=6ba",
            "eval_interval=3ba", "save_interval=3ba", "data.num_workers=0", "pruning.lagrangian_warmup=2ba"]
    folder, resumed = str(tmp_path / "run"), str(tmp_path / "resumed")
    proc = run([sys.executable, "train.py", TINY_YAML, *paths(tiny_setup, folder), *held], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run([sys.executable, "train.py", TINY_YAML, *paths(tiny_setup, resumed), *held,
                f"load_path={folder}/ep0-ba3-rank0.pt"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    end = [torch.load(os.path.join(f, "ep0-ba6-rank0.pt"), map_location="cpu", weights_only=False)["state"]
           for f in (folder, resumed)]
    for key, value in end[0]["model"].items():
        assert torch.equal(value, end[1]["model"][key]), key
    assert not torch.equal(end[0]["model"]["l0.lambdas"], torch.zeros_like(end[0]["model"]["l0.lambdas"]))  # moved
