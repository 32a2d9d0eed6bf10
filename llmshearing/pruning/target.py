"""The target shape of a run from its `pruning.target`: a preset name, an HF config path, explicit dims or a
parameter budget (solved by pruning/budget.py). Above shapes.py and budget.py, which it combines."""
from __future__ import annotations

import os

from transformers import PretrainedConfig

from llmshearing.checks import load_structured
from llmshearing.errors import ConfigError
from llmshearing.model.hf import check_family_target, head_dim_of
from llmshearing.pruning.budget import BUDGET_KEYS, budget_target
from llmshearing.pruning.shapes import PRESETS, SHAPE_KEYS, Shape, shape_of, validate_target


def resolve_target(spec, source: PretrainedConfig) -> Shape:
    """A target given as a preset name, an HF config path (file or directory), explicit dims or a parameter
    budget ({params: N} or {params_fraction: F}, solved by pruning/budget.py).

    Explicit dims may be partial: a dimension left out keeps the source size (so it is not pruned).
    """
    src = shape_of(source)
    if isinstance(spec, str):
        if spec in PRESETS:
            target = PRESETS[spec]
        elif os.path.exists(spec):
            cfg_path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
            raw = load_structured(cfg_path, "pruning.target")
            if not isinstance(raw, dict):
                raise ConfigError(f"pruning.target: '{cfg_path}' is not an HF config (a json object)")
            missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size") if k not in raw]
            if missing:
                raise ConfigError(f"target config '{cfg_path}' lacks {missing}; give explicit dims instead")
            target = Shape(
                raw["num_hidden_layers"], raw["hidden_size"], raw["num_attention_heads"],
                raw.get("num_key_value_heads") or raw["num_attention_heads"], raw["intermediate_size"],
            )
            target_head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
            if target_head_dim != head_dim_of(source):
                raise ConfigError(
                    f"target config '{cfg_path}' has head_dim {target_head_dim} but the source has "
                    f"{head_dim_of(source)}; head_dim is never pruned. Give explicit dims instead."
                )
        else:
            raise ConfigError(
                f"target '{spec}' is neither a preset ({', '.join(PRESETS)}) nor an existing config path"
            )
    elif isinstance(spec, dict):
        if set(spec) & set(BUDGET_KEYS):  # a parameter budget: the solver's uniform shape (pruning/budget.py)
            return budget_target(spec, source)
        unknown = set(spec) - set(SHAPE_KEYS)
        if unknown:
            raise ConfigError(f"target: unknown keys {sorted(unknown)}; allowed: {list(SHAPE_KEYS)}, or a budget "
                              f"{{params: N}} / {{params_fraction: F}}")
        values = {**src.as_dict(), **spec}
        if src.heads_per_group == 1 and "num_key_value_heads" not in spec:  # MHA: the KV heads follow the heads
            values["num_key_value_heads"] = values["num_attention_heads"]
        bad = {k: v for k, v in values.items() if not isinstance(v, int) or isinstance(v, bool)}
        if bad:
            raise ConfigError(f"target: dims must be integers, got {bad}")
        target = Shape(**values)
    else:
        raise ConfigError(f"target must be a preset name, a config path or a mapping of dims, got {spec!r}")
    validate_target(src, target)
    problem = check_family_target(source, target)
    if problem:
        raise ConfigError(f"target {target.as_dict()}: {problem}")
    return target
