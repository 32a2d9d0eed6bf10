"""Hard-concrete (L0) masks and the Lagrangian that drives their expected shape to a target.

Hard concrete (Louizos et al. 2018): with u ~ U(0, 1),
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta),   z = clamp(s * (r - l) + l, 0, 1)
so z is exactly 0 or 1 with positive probability. The probability that a gate is open,
    score = P(z > 0) = sigmoid(log_alpha - beta * log(-l / r)),
is differentiable and is what the Lagrangian constrains (Xia et al. 2024, Eq. 1-2).

As the paper's released code does (docs/fidelity.md): log_alpha starts at N(5, 0.01) and is clamped in place to
[ln 0.01, ln 100] before every use, so pruning starts from the (almost) dense model; the Lagrangian is taken
per row (per layer for heads and intermediate dims) and averaged; a kept unit's test-time value is
sigmoid(log_alpha / beta * 0.8), never 0; and evaluation during pruning keeps the expected number of units per row
(the model's current expected size) unless `eval_target_model`, while the export always keeps the target.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from llmshearing.model.decoder import Masks
from llmshearing.pruning.shapes import Shape

TEMPERATURE = 2.0 / 3.0
LIMIT_LEFT, LIMIT_RIGHT = -0.1, 1.1
EPS = 1e-6
# The mask-noise seed of a microbatch is one integer per (seed, step, position of its first sample in the
# global batch): distinct for global batches below 2**20 samples and runs below 1,000,033 steps (a prime, so
# consecutive seeds do not share seeds within that many steps).
NOISE_SAMPLES_PER_STEP = 2**20
NOISE_STEPS_PER_SEED = 1_000_033
INIT_LOG_ALPHA = 5.0  # the released code's initial mean (its droprate_init is overwritten: dead code)
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))  # the released code's in-place clamp before every forward
TEST_TIME_SCALE = 0.8  # test-time value sigmoid(log_alpha / TEMPERATURE * 0.8), as the released code
# `pruning.init: activation`: the kept units of each row start in the top INIT_BAND of the clamp range, the others in
# the bottom one, in score order (`oneshot.set_scores`); chosen by measurement (docs/fidelity.md, "Importance-initialised
# masks")
INIT_BAND = 1.0


def init_bands(clamp: tuple[float, float] | None = LOG_ALPHA_RANGE) -> tuple[tuple[float, float], tuple[float, float]]:
    """(kept, dropped) log_alpha bands of `pruning.init: activation` inside `clamp` (None: no clamp; the default
    range)."""
    low, high = clamp or LOG_ALPHA_RANGE
    return (high - INIT_BAND, high), (low, low + INIT_BAND)


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator seeded with `seed` for drawing on `device`. A meta tensor has no generator of its own (torch
    refuses `Generator(device="meta")`) and draws nothing: a CPU one stands in, so the second-device tier
    (llmshearing/fake_device.py) runs the same code; CPU and CUDA draw from their own device's generator."""
    return torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(seed)


def row_ranks(x: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """The rank of every entry within its row (last dim), 0 = the smallest (largest with `descending`); a stable
    sort breaks ties by index."""
    order = torch.argsort(x.detach(), dim=-1, descending=descending, stable=True)
    positions = torch.arange(x.shape[-1], device=order.device).expand_as(order).contiguous()
    return torch.empty_like(order).scatter_(-1, order, positions)


class HardConcrete(nn.Module):
    """Gates of shape `shape`; the last dim holds the units of which `keep` survive per row."""

    def __init__(self, shape: tuple[int, ...], keep: int, init_drop: float | None = None, init_std: float = 0.01,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.shape, self.keep = tuple(shape), keep
        # init_drop p: log_alpha = log((1 - p) / p); None: the released code's mean of 5
        mean = INIT_LOG_ALPHA if init_drop is None else math.log(1 - init_drop) - math.log(init_drop)
        self.log_alpha = nn.Parameter(torch.empty(self.shape).normal_(mean, init_std, generator=generator))

    @property
    def units(self) -> int:
        return self.shape[-1]

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(self.shape, device=self.log_alpha.device, generator=generator).clamp(EPS, 1 - EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / TEMPERATURE)
        return (s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0, 1)

    def score(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - TEMPERATURE * math.log(-LIMIT_LEFT / LIMIT_RIGHT))

    def keep_index(self) -> torch.Tensor:
        """Indices (sorted) of the `keep` highest-scoring units of each row; ties go to the lower index."""
        order = torch.argsort(self.log_alpha.detach(), dim=-1, descending=True, stable=True)
        return order[..., : self.keep].sort(dim=-1).values

    def expected_keep(self) -> torch.Tensor:
        """Units each row keeps at its current expected size: units - round(units - sum of P(z > 0)), as the
        released code's evaluation during pruning (`eval_target_model: false`)."""
        score = self.score().detach()
        return self.units - torch.round(self.units - score.sum(-1)).long()

    def deterministic(self, keep: torch.Tensor | int | None = None) -> torch.Tensor:
        """Test-time gates: the `keep` (default: the target count; or a count per row) highest-scoring units of
        each row carry sigmoid(log_alpha / beta * 0.8), which is never 0; all others are 0."""
        value = torch.sigmoid(self.log_alpha / TEMPERATURE * TEST_TIME_SCALE)
        rank = row_ranks(self.log_alpha, descending=True)  # 0 = the highest-scoring unit of its row
        keep = torch.as_tensor(self.keep if keep is None else keep, device=rank.device)
        kept = rank < (keep.unsqueeze(-1) if keep.dim() else keep)
        return torch.where(kept, value, torch.zeros_like(value))

    def expected_sparsity(self) -> torch.Tensor:
        return 1 - self.score().mean()

    def expected_sparsity_rows(self) -> torch.Tensor:
        """Expected sparsity of every row (e.g. of every layer's heads), the released code's Lagrangian unit."""
        return 1 - self.score().mean(-1)

    def target_sparsity(self) -> float:
        return 1 - self.keep / self.units


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def _reverse_grad(x: torch.Tensor) -> torch.Tensor:
    return _ReverseGrad.apply(x)


def mask_specs(source: Shape, target: Shape) -> dict[str, tuple[tuple[int, ...], int]]:
    """Which masks a source->target pruning needs: name -> (gate shape, units kept per row).

    Heads are masked in two levels so every kept KV group keeps the same number of query heads:
    `kv_head` gates whole groups (a closed group removes its K/V and all its query heads), and
    `head` gates query heads inside each group, keeping the top `target heads / target groups` per
    group. A level whose count does not change gets no mask.
    """
    L, R = source.num_hidden_layers, source.heads_per_group
    specs = {}
    if target.num_hidden_layers < L:
        specs["layer"] = ((L,), target.num_hidden_layers)
    if target.hidden_size < source.hidden_size:
        specs["hidden"] = ((source.hidden_size,), target.hidden_size)
    if target.num_key_value_heads < source.num_key_value_heads:
        specs["kv_head"] = ((L, source.num_key_value_heads), target.num_key_value_heads)
    if target.heads_per_group < R:
        specs["head"] = ((L, source.num_key_value_heads, R), target.heads_per_group)
    if target.intermediate_size < source.intermediate_size:
        specs["intermediate"] = ((L, source.intermediate_size), target.intermediate_size)
    return specs


class L0Module(nn.Module):
    """All masks of one pruning run plus their Lagrange multipliers.

    For each mask j the loss adds  mean over rows r of  lambda1_j * (s_jr - t_j) + lambda2_j * (s_jr - t_j)^2,
    where s_jr is row r's expected sparsity (a row: the layers of the layer mask, one layer's heads or
    intermediate dims) and t_j the target sparsity ramped linearly from 0 over `warmup_steps`.
    The multipliers are trained by gradient *ascent*: their gradient is reversed inside the autograd
    graph (`_reverse_grad`), so an ordinary optimizer with a positive learning rate maximizes over them
    and this holds under DDP/FSDP wrapping too (the original code used a negative learning rate, which
    torch optimizers reject).
    """

    # Under FSDP the masks stay whole and replicated on every rank (Composer skips children marked so): the
    # Lagrangian and the expected shape read them outside forward. Their gradients are averaged across ranks
    # by callbacks.ReplicatedGrads.
    _fsdp_wrap = False

    def __init__(self, source: Shape, target: Shape, warmup_steps: int = 0, init_drop: float | None = None,
                 seed: int = 0, log_alpha_range: tuple[float, float] | None = LOG_ALPHA_RANGE,
                 eval_target_model: bool = False, hidden_mask: str = "residual", penalty: float | None = None):
        super().__init__()
        # None: the quadratic term's weight is the learned lambda_2 (the paper); a number: a fixed penalty rho, the
        # augmented Lagrangian's rho / 2 * gap^2 (lambda_2 then stays 0): a restoring force from step 0
        self.penalty = penalty
        self.source, self.target, self.warmup_steps, self.seed = source, target, warmup_steps, seed
        # residual: the hidden gate scales the embedding and the residual writes; original (the released code):
        # every RMSNorm output too, so a block reads z * norm(x) (z^2 on what the gate already scaled)
        self.hidden_mask = hidden_mask
        self.log_alpha_range = None if log_alpha_range is None else tuple(log_alpha_range)
        self.eval_target_model = eval_target_model  # eval keeps the target size, not the expected size
        init = torch.Generator().manual_seed(seed)  # the initial log_alphas are a function of the seed alone
        self.masks = nn.ModuleDict(
            {name: HardConcrete(shape, keep, init_drop, generator=init) for name, (shape, keep) in mask_specs(source, target).items()}
        )
        self.lambdas = nn.Parameter(torch.zeros(len(self.masks), 2))
        self.step = 0  # the training batch index: the warm-up ramp and the mask noise read it (set by forward)
        self.sample_offset = 0  # this rank's first sample in the global batch (rank * per-device batch)
        self._drawn = (-1, 0)  # (step, samples this rank has drawn masks for within the step)

    def noise(self, samples: int) -> torch.Generator:
        """The mask noise of one microbatch of `samples` sequences: a pure function of (seed, step, position
        of the microbatch's first sample in the global batch). So resuming replays exactly the noise of the
        uninterrupted run whatever the global RNG did, and N ranks draw what one rank with the same
        microbatch size draws for the same global batch."""
        step, drawn = self._drawn
        drawn = drawn if step == self.step else 0
        self._drawn = (self.step, drawn + samples)
        key = (self.seed * NOISE_STEPS_PER_SEED + self.step) * NOISE_SAMPLES_PER_STEP + self.sample_offset + drawn
        return seeded_generator(key % 2**63, self.lambdas.device)

    def forward(self, samples: int = 1, step: int | None = None) -> Masks:
        """The masks for a microbatch of `samples` sequences (one draw shared by the microbatch) at training
        batch `step` (None: keep the current `self.step`)."""
        if step is not None:
            self.step = step
        self.constrain()
        gen = self.noise(samples) if self.training else None
        if self.training:
            gates = {n: m.sample(gen) for n, m in self.masks.items()}
        else:
            gates = {n: m.deterministic(None if self.eval_target_model else m.expected_keep()) for n, m in self.masks.items()}
        L, R = self.source.num_hidden_layers, self.source.heads_per_group
        head = None
        if "kv_head" in gates or "head" in gates:
            kv = gates.get("kv_head", torch.ones(L, self.source.num_key_value_heads, device=self.lambdas.device))
            q = gates.get("head", torch.ones(L, self.source.num_key_value_heads, R, device=self.lambdas.device))
            head = (kv.unsqueeze(-1) * q).reshape(L, -1)
        hidden = gates.get("hidden")
        kept = None
        if hidden is not None:
            kept = (hidden > 0).sum().clamp(min=1)
        norm_gate = hidden if self.hidden_mask == "original" else None
        return Masks(gates.get("layer"), hidden, kept, head, gates.get("intermediate"), norm_gate=norm_gate)

    @torch.no_grad()
    def lower_kept_to_target(self) -> None:
        """Shift the `keep` highest log_alpha of every row down by one amount per row so that the row's expected
        count (the sum of P(z > 0)) is exactly its target: the units below the kept ones cannot go under the
        clamp floor (P(z > 0) 0.047 at ln 0.01) and so hold probability mass the target count does not have. Without
        this the Lagrangian starts with a gap (SmolLM2 -> half: 4.28 expected heads for 4) and closes it itself,
        winding its multipliers up on the way (docs/convergence.md). The keep set and its order are unchanged."""
        for mask in self.masks.values():
            rank = row_ranks(mask.log_alpha, descending=True)
            top = rank < mask.keep
            rest = torch.where(top, torch.zeros_like(mask.log_alpha), mask.score()).sum(-1, keepdim=True)

            def count(shift):
                a = torch.where(top, mask.log_alpha - shift, mask.log_alpha)
                return torch.where(top, torch.sigmoid(a - TEMPERATURE * math.log(-LIMIT_LEFT / LIMIT_RIGHT)),
                                   torch.zeros_like(a)).sum(-1, keepdim=True) + rest

            lo = torch.zeros_like(rest)
            hi = torch.full_like(rest, 20.0)
            for _ in range(50):  # bisection: the count falls as the shift grows
                mid = (lo + hi) / 2
                over = count(mid) > mask.keep
                lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
            shift = torch.where(count(torch.zeros_like(rest)) > mask.keep, (lo + hi) / 2, torch.zeros_like(rest))
            mask.log_alpha.copy_(torch.where(top, mask.log_alpha - shift, mask.log_alpha))

    @torch.no_grad()
    def open_at_target(self) -> None:
        """`pruning.init: uniform` with `init_at_target`: every gate of a mask starts at the one log_alpha whose
        P(z > 0) is the mask's keep fraction (the init noise kept), so the expected shape is the target at step 0.
        From the released start (every gate at the clamp top, P(open) 0.998) the multipliers must grow until they
        outweigh the LM on saturated gates (P'(log_alpha) ~0.002), and that size is far more than holding unsaturated
        gates takes: the masks then overshoot the target. Measured on SmolLM2 (docs/convergence.md, round 5, one seed):
        this start removes the overshoot but puts the LM at 29 nats at step 0 and the masks still drift 10-17%."""
        for mask in self.masks.values():
            q = mask.keep / mask.units
            centre = math.log(q) - math.log1p(-q) + TEMPERATURE * math.log(-LIMIT_LEFT / LIMIT_RIGHT)
            mask.log_alpha.add_(centre - mask.log_alpha.mean())

    @torch.no_grad()
    def constrain(self) -> None:
        """Clamp every log_alpha in place to `log_alpha_range` (the released code does so before every forward)."""
        if self.log_alpha_range is not None:
            for mask in self.masks.values():
                mask.log_alpha.clamp_(*self.log_alpha_range)

    @contextlib.contextmanager
    def target_masks(self):
        """Test-time masks of exactly the target shape (what export folds), whatever `eval_target_model` says."""
        training, at_target = self.training, self.eval_target_model
        self.eval()
        self.eval_target_model = True
        try:
            yield
        finally:
            self.eval_target_model = at_target
            self.train(training)

    def target_sparsity(self, name: str) -> float:
        ramp = 1.0 if self.warmup_steps <= 0 else min(1.0, self.step / self.warmup_steps)
        return self.masks[name].target_sparsity() * ramp

    def lagrangian(self, logs: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, logs); `logs=False` skips the per-mask values (a host sync each on a GPU) in the training step."""
        loss = self.lambdas.new_zeros(())
        values = {}
        lambdas = _reverse_grad(self.lambdas)
        for j, (name, mask) in enumerate(self.masks.items()):
            gap = mask.expected_sparsity_rows() - self.target_sparsity(name)  # one gap per row (per layer)
            quadratic = lambdas[j, 1] if self.penalty is None else self.penalty / 2
            loss = loss + (lambdas[j, 0] * gap + quadratic * gap**2).mean()
            if not logs:
                continue
            values[f"l0/{name}/expected_sparsity"] = float(mask.expected_sparsity())
            values[f"l0/{name}/target_sparsity"] = self.target_sparsity(name)
            values[f"l0/{name}/lambda_1"] = float(self.lambdas[j, 0])
            values[f"l0/{name}/lambda_2"] = float(self.lambdas[j, 1])
        return loss, values

    @torch.no_grad()
    def expected_shape(self) -> dict[str, float]:
        """Expected counts under the current gate scores (each structure taken independently)."""
        score = {n: m.score() for n, m in self.masks.items()}
        src, device = self.source, self.lambdas.device  # a level without a mask counts as all kept
        kv_score = score.get("kv_head", torch.ones(src.num_hidden_layers, src.num_key_value_heads, device=device))
        q_score = score.get("head", torch.ones(*kv_score.shape, src.heads_per_group, device=device))
        return {
            "num_hidden_layers": float(score["layer"].sum()) if "layer" in score else src.num_hidden_layers,
            "hidden_size": float(score["hidden"].sum()) if "hidden" in score else src.hidden_size,
            "num_attention_heads": float((kv_score.unsqueeze(-1) * q_score).sum((1, 2)).mean()),
            "num_key_value_heads": float(kv_score.sum(-1).mean()),
            "intermediate_size": float(score["intermediate"].sum(-1).mean()) if "intermediate" in score else src.intermediate_size,
        }
