"""Parameter budgets: `pruning.target: {params: N}` or `{params_fraction: F}` -> one uniform target shape.

The rule (deterministic, no search over training outcomes):

1. **Common factor.** Find s in (0, 1) with param_count(s * source) = budget, every one of the five dims scaled by
   the same s (as real numbers). This keeps the source's proportions: intermediate/hidden, heads/hidden, the GQA
   ratio and depth/width, so the target is a smaller copy of a model someone already tuned.
2. **Lattice.** Valid shapes have integer layers and heads, num_attention_heads = num_key_value_heads * g with
   1 <= g <= the source's heads per KV group, every dim between its minimum and the source's, head_dim unchanged
   (never pruned), and hidden_size / intermediate_size in multiples of `size_multiple(source dim)`: 64, the
   granularity every supported paper-scale model is built on (4096, 11008, 14336, 576, 896, 4864 ...), or for small
   sources the largest power of two that divides the source dim and leaves at least 8 sizes to choose from.
   A family whose transformers config derives head_dim from hidden / heads (GPT-NeoX; Phi-3 with rope scaling,
   `model/hf.py` `check_family_target`) takes hidden_size = heads x head_dim instead.
3. **Neighbours.** Hidden size and KV heads each round down and up from s * source; query heads take the
   multiples of the KV heads just below and above s * source heads; layers take every count from 1 to the source's
   (so that depth can absorb the budget when the widths are clipped at their minimum). For each such combination the
   intermediate size, the finest knob (one step costs layers * 3 * hidden * multiple parameters), takes the two
   multiples around the exact count that meets the budget. The source shape itself is not a candidate: a budget
   below its count must prune something.
4. **Choice.** Among the neighbours whose exact count is within half an intermediate step of the budget (the
   rounding tolerance: nothing finer is reachable by rounding), take the one closest to the proportional shape
   (least sum over the five dims of log(dim / (s * source dim))^2); ties by the smaller gap, then the smaller
   shape. Picking the single closest count instead would choose among shapes that all meet the budget to within
   one rounding step by differences below that step, i.e. at random with respect to the architecture. When no
   neighbour is within tolerance (a budget near the smallest or the whole model, where dims are clipped), the
   closest count wins.

Every count is `shapes.param_count`, the one parameter counter of the project.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from transformers import PretrainedConfig

from llmshearing.errors import ConfigError
from llmshearing.model.hf import check_family_target, head_dim_of
from llmshearing.pruning.shapes import SHAPE_KEYS, Shape, param_count, shape_of, validate_target

BUDGET_KEYS = ("params", "params_fraction")
MAX_MULTIPLE = 64
MIN_SIZE_STEPS = 8


@dataclass(frozen=True)
class Solution:
    shape: Shape
    params: int
    budget: int
    factor: float  # the common factor s of step 1
    alternatives: tuple[tuple[Shape, int], ...]  # the next neighbours in the order of step 4


def size_multiple(size: int) -> int:
    """Rounding multiple of a hidden or intermediate size: 64, halved while it does not divide the source size or
    leaves fewer than 8 sizes (a tiny source with hidden 64 gets 8), down to 1."""
    m = MAX_MULTIPLE
    while m > 1 and (size % m or size // m < MIN_SIZE_STEPS):
        m //= 2
    return m


def smallest_shape(source: Shape) -> Shape:
    return Shape(1, size_multiple(source.hidden_size), 1, 1, size_multiple(source.intermediate_size))


def count(shape: Shape, config: PretrainedConfig) -> int:
    return int(param_count(shape, config))


def budget_tolerance(shape: Shape, config: PretrainedConfig) -> float:
    """Half the count of one intermediate step of `shape`: how close rounding can bring a shape to a budget."""
    step = size_multiple(config.intermediate_size)
    return (count(replace(shape, intermediate_size=shape.intermediate_size + step), config) - count(shape, config)) / 2


def parse_budget_number(value, key: str) -> int:
    """A whole number of parameters: an int, an integral float (7e7) or a string like '70M', '1.3B', '7e7'."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: expected a whole number of parameters (like 70000000, 7e7 or 70M), got {value!r}")
    if isinstance(value, str):
        n = parse_count(value, key)  # suffixes give floats like 1.3 * 1e9: integral up to float rounding
        if abs(n - round(n)) > 1e-9 * n:
            raise ConfigError(f"{key}: {value!r} is not a whole number of parameters")
        return round(n)
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ConfigError(f"{key}: {value!r} is not a whole number of parameters")
    return int(value)


def budget_of(spec: dict, config: PretrainedConfig) -> int:
    """The budget of a `{params: N}` or `{params_fraction: F}` target, checked against the feasible range."""
    given = [k for k in BUDGET_KEYS if k in spec]
    others = sorted(set(spec) - set(BUDGET_KEYS))
    if len(given) != 1 or others:
        raise ConfigError(f"pruning.target: a budget is exactly one of {{params: N}} or {{params_fraction: F}}, "
                          f"without dims; got keys {sorted(spec)}")
    src = shape_of(config)
    low, high = count(smallest_shape(src), config), count(src, config)
    if given[0] == "params_fraction":
        f = spec["params_fraction"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0 < f < 1:
            raise ConfigError(f"pruning.target.params_fraction: expected a number in (0, 1), got {f!r}")
        if f * high < low:
            least = math.ceil(low / high * 1e4) / 1e4
            raise ConfigError(f"pruning.target.params_fraction={f} is below the smallest valid shape "
                              f"{_dims(smallest_shape(src))} ({low:,} params); feasible: [{least}, 1)")
        return round(f * high)
    n = parse_budget_number(spec["params"], "pruning.target.params")
    if not low <= n < high:
        raise ConfigError(f"pruning.target.params={n:,} is outside the feasible range [{low:,}, {high:,}): from the "
                          f"smallest valid shape {_dims(smallest_shape(src))} to below the source's own count")
    return n


def budget_target(spec: dict, config: PretrainedConfig) -> Shape:
    """target.resolve_target's branch for budgets."""
    return solve_budget(config, budget_of(spec, config)).shape


def common_factor(config: PretrainedConfig, budget: float) -> float:
    """s with param_count(s * source) = budget (the count grows with s, so bisection)."""
    src = shape_of(config).as_dict()
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if param_count(Shape(**src), config, floats={k: mid * v for k, v in src.items()}) < budget:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def solve_budget(config: PretrainedConfig, budget: int, alternatives: int = 4) -> Solution:
    """The target shape for `budget` parameters by the module's rule, and the next `alternatives` neighbours."""
    src = shape_of(config)
    s = common_factor(config, budget)
    ideal = {k: s * v for k, v in src.as_dict().items()}
    mh, mi = size_multiple(src.hidden_size), size_multiple(src.intermediate_size)

    def around(x: float, step: int, top: int) -> set[int]:
        return {min(max(step * f(x / step), step), top) for f in (math.floor, math.ceil)}

    candidates = set()
    for layers in range(1, src.num_hidden_layers + 1):
        for hidden in around(ideal["hidden_size"], mh, src.hidden_size):
            for kv in around(ideal["num_key_value_heads"], 1, src.num_key_value_heads):
                for per_group in around(ideal["num_attention_heads"] / kv, 1, src.heads_per_group):
                    base = Shape(layers, hidden, kv * per_group, kv, 0)
                    if check_family_target(config, base):
                        base = family_shape(config, base)
                        if base is None:
                            continue
                    p0 = count(base, config)
                    per_step = count(replace(base, intermediate_size=mi), config) - p0
                    for inter in around((budget - p0) / per_step * mi, mi, src.intermediate_size):
                        candidates.add(replace(base, intermediate_size=inter))
    candidates.discard(src)

    def rank(shape: Shape):
        gap = abs(count(shape, config) - budget)
        distortion = sum(math.log(getattr(shape, k) / ideal[k]) ** 2 for k in SHAPE_KEYS)
        if gap <= budget_tolerance(shape, config):
            return (0, distortion, gap, astuple(shape))
        return (1, gap, distortion, astuple(shape))

    ranked = sorted(candidates, key=rank)
    validate_target(src, ranked[0])
    return Solution(ranked[0], count(ranked[0], config), budget, s,
                    tuple((c, count(c, config)) for c in ranked[1:1 + alternatives]))


def family_shape(config: PretrainedConfig, shape: Shape) -> Shape | None:
    """The neighbour a family can load (GPT-NeoX, Phi-3 with rope scaling: hidden_size = heads x head_dim, so the
    hidden size follows the heads), or None."""
    fixed = replace(shape, hidden_size=shape.num_attention_heads * head_dim_of(config))
    src = shape_of(config)
    ok = fixed.hidden_size <= src.hidden_size and not check_family_target(config, fixed)
    return fixed if ok else None


def astuple(shape: Shape) -> tuple[int, ...]:
    return tuple(getattr(shape, k) for k in SHAPE_KEYS)


def _dims(shape: Shape) -> str:
    return "/".join(str(v) for v in astuple(shape))


def parse_cli_budget(params: str | None, fraction: float | None, config: PretrainedConfig) -> int:
    """`llmshearing target --params N | --fraction F`: the same checks as the config keys, named as options."""
    if (params is None) == (fraction is None):
        raise ConfigError("target: give exactly one of --params N (like 70000000, 7e7, 70M, 1.3B) or --fraction F")
    spec = {"params": params} if params is not None else {"params_fraction": fraction}
    try:
        return budget_of(spec, config)
    except ConfigError as e:
        option = "--params" if params is not None else "--fraction"
        raise ConfigError(re.sub(r"pruning\.target\.params(_fraction)?", option, str(e))) from None


_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(value, key: str = "parameter count") -> float:
    """A positive parameter count: a number, or a string like '4.05e8', '1.3B', '410M'."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a positive number of parameters, got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMbBgGtT]?)\s*", value)
        try:
            n = float(m.group(1)) * (_SUFFIXES[m.group(2).lower()] if m.group(2) else 1.0) if m else float("nan")
        except ValueError:
            n = float("nan")
    else:
        n = float("nan")
    if not math.isfinite(n) or n <= 0:
        raise ConfigError(f"{key}: expected a positive number of parameters (like 1.3e9 or 1.3B), got {value!r}")
    return n
