import math

import pytest
import torch

from llmshearing.pruning.shapes import Shape
from llmshearing.pruning.masks import HardConcrete, L0Module, mask_specs

SRC = Shape(4, 64, 6, 2, 96)
TGT = Shape(3, 48, 2, 1, 64)


def test_samples_are_in_unit_interval_with_exact_zeros_and_ones():
    torch.manual_seed(0)
    gate = HardConcrete((20000,), keep=1, init_drop=0.5)
    z = gate.sample()
    assert z.min() >= 0 and z.max() <= 1
    # stretched to (-0.1, 1.1) then clamped: both ends carry probability mass
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()


def test_score_is_hand_computed_probability_of_open_gate():
    gate = HardConcrete((3,), keep=1)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([0.0, 2.0, -1.0]))
    # P(z > 0) = sigmoid(log_alpha - beta * log(-l / r)) with beta = 2/3, l = -0.1, r = 1.1
    shift = (2 / 3) * math.log(0.1 / 1.1)  # = -1.59865...
    expected = [1 / (1 + math.exp(-(a - shift))) for a in (0.0, 2.0, -1.0)]
    assert gate.score().tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[0] == pytest.approx(0.83183, abs=1e-4)
    assert float(gate.expected_sparsity()) == pytest.approx(1 - sum(expected) / 3, abs=1e-6)


def test_score_matches_monte_carlo_frequency():
    torch.manual_seed(1)
    gate = HardConcrete((200000,), keep=1)
    with torch.no_grad():
        gate.log_alpha.fill_(-0.7)
    freq = float((gate.sample() > 0).float().mean())
    assert freq == pytest.approx(float(gate.score()[0]), abs=0.005)


def test_init_drop_sets_log_alpha():
    gate = HardConcrete((1000,), keep=1, init_drop=0.2, init_std=0.0)
    assert torch.allclose(gate.log_alpha, torch.full((1000,), math.log(0.8 / 0.2)))


def test_deterministic_keeps_exactly_k_per_row_and_a_kept_unit_is_never_zero():
    """Test-time value of a kept unit: sigmoid(log_alpha / (2/3) * 0.8) = sigmoid(1.2 log_alpha), the released
    code's (l0_module.py `soft_mask`); it is positive for every kept unit, even a very closed one."""
    gate = HardConcrete((2, 5), keep=2)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([[0.0, 3.0, -1.0, 1.0, -5.0], [-9.0, -8.0, -7.0, -6.0, -5.0]]))
    z = gate.deterministic()
    assert (z > 0).sum(-1).tolist() == [2, 2]
    assert gate.keep_index().tolist() == [[1, 3], [3, 4]]
    assert z[0].tolist() == pytest.approx([0, 0.9734030064, 0, 0.7685247835, 0], abs=1e-7)  # sigmoid(3.6), sigmoid(1.2)
    assert z[1].tolist() == pytest.approx([0, 0, 0, 7.4658e-04, 2.4726e-03], rel=1e-3)  # sigmoid(-7.2), sigmoid(-6)


def test_eval_during_pruning_keeps_the_expected_number_per_row():
    """eval_target_model false (the released code's pruning evals): each row keeps units - round(units - sum of
    P(z > 0)) units; the export (target_masks) keeps the target count."""
    gate = HardConcrete((2, 4), keep=1)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([[4.6, 4.6, 4.6, -4.6], [4.6, -4.6, -4.6, -4.6]]))
    # P(z>0) = sigmoid(a + 1.59865): 0.99798 at 4.6, 0.04757 at -4.6 -> expected 3.04 and 1.14 units
    assert gate.expected_keep().tolist() == [3, 1]
    assert ((gate.deterministic(gate.expected_keep()) > 0).sum(-1)).tolist() == [3, 1]
    l0 = L0Module(Shape(4, 64, 6, 2, 96), Shape(4, 64, 6, 2, 48))
    l0.eval()
    assert int((l0().intermediate > 0).sum(-1)[0]) == 96  # init: every gate open -> the expected size is all
    with l0.target_masks():
        assert int((l0().intermediate > 0).sum(-1)[0]) == 48
    assert not l0.training and not l0.eval_target_model


def test_initial_log_alpha_and_clamp_follow_the_released_code():
    """log_alpha ~ N(5, 0.01) (l0_module.py: `mean = 5`, droprate_init unused), clamped in place to
    [ln 0.01, ln 100] at every forward: every gate starts at exactly ln 100, open with probability 0.998."""
    l0 = L0Module(SRC, TGT)
    la = l0.masks["intermediate"].log_alpha
    assert float(la.mean()) == pytest.approx(5.0, abs=0.01) and float(la.std()) == pytest.approx(0.01, rel=0.1)
    l0.train()
    l0(1, step=0)
    for mask in l0.masks.values():
        assert torch.all(mask.log_alpha == torch.tensor(math.log(100.0)))
    p_open = 1 / (1 + math.exp(-(math.log(100.0) - (2 / 3) * math.log(0.1 / 1.1))))
    assert p_open == pytest.approx(0.99798, abs=1e-5)
    assert float(l0.masks["layer"].expected_sparsity()) == pytest.approx(1 - p_open, abs=1e-6)
    with torch.no_grad():
        l0.masks["layer"].log_alpha.copy_(torch.tensor([-9.0, 0.3, 9.0, 4.0]))
    l0(1, step=1)
    assert l0.masks["layer"].log_alpha.tolist() == pytest.approx([math.log(0.01), 0.3, math.log(100.0), 4.0])
    free = L0Module(SRC, TGT, init_drop=0.5, log_alpha_range=None)  # the knobs: init_drop and no clamp
    free.train()
    free(1, step=0)
    assert float(free.masks["layer"].log_alpha.mean()) == pytest.approx(0.0, abs=0.02)


def test_plan_masks_gqa_levels():
    plan = mask_specs(SRC, TGT)
    assert plan == {
        "layer": ((4,), 3), "hidden": ((64,), 48), "kv_head": ((4, 2), 1),
        "head": ((4, 2, 3), 2), "intermediate": ((4, 96), 64),
    }
    # same heads per group: no in-group mask; same KV groups: no group mask
    assert set(mask_specs(SRC, Shape(4, 64, 3, 1, 96))) == {"kv_head"}
    assert set(mask_specs(SRC, Shape(4, 64, 4, 2, 96))) == {"head"}
    assert mask_specs(SRC, SRC) == {}


def test_lagrangian_value_matches_formula():
    l0 = L0Module(SRC, TGT, warmup_steps=10)
    l0.step = 5
    with torch.no_grad():
        l0.lambdas.copy_(torch.tensor([[0.5, 2.0]] * len(l0.masks)))
    loss, logs = l0.lagrangian()
    expected = 0.0
    for name, mask in l0.masks.items():
        t = (1 - mask.keep / mask.units) * 0.5  # half-way through warm-up
        assert logs[f"l0/{name}/target_sparsity"] == pytest.approx(t)
        rows = (1 - mask.score().mean(-1)).flatten().tolist()
        expected += sum(0.5 * (s - t) + 2.0 * (s - t) ** 2 for s in rows) / len(rows)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_lagrangian_is_per_row_with_hand_computed_value_and_gradients():
    """The released code: lambda1 (s_r - t) + lambda2 (s_r - t)^2 for each row (layer) r, then the mean. Two layers
    of 2 intermediate dims, target 1 of 2 (t = 0.5), log_alpha rows (a, a) and (b, b)."""
    l0 = L0Module(Shape(2, 8, 2, 2, 2), Shape(2, 8, 2, 2, 1))
    assert list(l0.masks) == ["intermediate"]
    a, b = 2.0, -1.0
    with torch.no_grad():
        l0.masks["intermediate"].log_alpha.copy_(torch.tensor([[a, a], [b, b]]))
        l0.lambdas.copy_(torch.tensor([[0.3, 1.5]]))
    shift = (2 / 3) * math.log(0.1 / 1.1)
    p = [1 / (1 + math.exp(-(x - shift))) for x in (a, b)]  # P(open): 0.97304, 0.64486
    gaps = [(1 - q) - 0.5 for q in p]  # -0.47304, -0.14486
    loss, _ = l0.lagrangian()
    assert float(loss) == pytest.approx(sum(0.3 * g + 1.5 * g * g for g in gaps) / 2, rel=1e-6)
    global_gap = sum(gaps) / 2  # the old, global form differs by lambda2 x the variance over layers
    assert float(loss) != pytest.approx(0.3 * global_gap + 1.5 * global_gap**2, rel=1e-3)
    loss.backward()
    # d/dlambda (reversed for ascent): -mean(gap), -mean(gap^2)
    assert l0.lambdas.grad[0].tolist() == pytest.approx([-sum(gaps) / 2, -sum(g * g for g in gaps) / 2], rel=1e-5)
    # d/dlog_alpha of row r, unit i: (0.3 + 3 gap_r) * d s_r / d a = (0.3 + 3 gap_r) * (-p_r (1 - p_r) / 2), / 2 rows
    want = [(0.3 + 3 * g) * (-q * (1 - q) / 2) / 2 for g, q in zip(gaps, p)]
    grad = l0.masks["intermediate"].log_alpha.grad
    assert grad[:, 0].tolist() == pytest.approx(want, rel=1e-5) and torch.equal(grad[:, 0], grad[:, 1])


def test_lambda_update_is_gradient_ascent():
    torch.manual_seed(0)
    l0 = L0Module(Shape(4, 64, 6, 2, 96), Shape(2, 64, 6, 2, 96), warmup_steps=0, init_drop=0.1)
    gap = float(l0.masks["layer"].expected_sparsity()) - 0.5  # sparsity far below target: gap < 0
    assert gap < -0.3
    opt = torch.optim.SGD([l0.lambdas], lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        loss, _ = l0.lagrangian()
        loss.backward()
        opt.step()
    # ascent: lambda_1 += lr * gap, lambda_2 += lr * gap^2 (masks untouched, so the gap is constant)
    assert float(l0.lambdas[0, 0]) == pytest.approx(3 * gap, rel=1e-5)
    assert float(l0.lambdas[0, 1]) == pytest.approx(3 * gap**2, rel=1e-5)


def test_lambdas_grow_while_constraint_violated_and_masks_move_to_target():
    torch.manual_seed(0)
    l0 = L0Module(SRC, TGT, warmup_steps=0)
    opt = torch.optim.AdamW([{"params": [m.log_alpha for m in l0.masks.values()], "lr": 0.1},
                             {"params": [l0.lambdas], "lr": 0.05}], weight_decay=0.0)
    magnitudes = []
    for _ in range(60):
        opt.zero_grad()
        loss, _ = l0.lagrangian()
        loss.backward()
        opt.step()
        magnitudes.append(float(l0.lambdas.abs().sum()))
    assert magnitudes[20] > magnitudes[0] and magnitudes[40] > magnitudes[20]
    for _ in range(400):
        opt.zero_grad()
        l0.lagrangian()[0].backward()
        opt.step()
    for name, mask in l0.masks.items():
        assert float(mask.expected_sparsity()) == pytest.approx(mask.target_sparsity(), abs=0.05), name


def test_expected_shape_counts():
    l0 = L0Module(SRC, TGT)
    with torch.no_grad():
        for m in l0.masks.values():
            m.log_alpha.fill_(50.0)  # every gate open with probability 1
    shape = l0.expected_shape()
    assert shape == pytest.approx({k: float(v) for k, v in SRC.as_dict().items()}, rel=1e-5)


def test_initial_masks_follow_the_seed_alone():
    """Two runs with the same seed start from the same log_alphas whatever the global RNG did before."""
    source, target = Shape(4, 64, 4, 2, 128), Shape(2, 32, 2, 1, 64)
    torch.manual_seed(1)
    a = L0Module(source, target, seed=3)
    torch.manual_seed(2)
    b, c = L0Module(source, target, seed=3), L0Module(source, target, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.masks["intermediate"].log_alpha, c.masks["intermediate"].log_alpha)
