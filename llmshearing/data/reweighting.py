"""The domain weights of dynamic batch loading: checked, and updated from per-domain loss gaps (the rule). The sampler
that draws batches in those proportions is `data/mixture.py`."""
from __future__ import annotations

import numpy as np

from llmshearing.errors import ConfigError


def check_weights(weights, domains: list[str], key: str = "weights") -> np.ndarray:
    """A mapping or sequence of non-negative numbers summing to 1 -> array in `domains` order."""
    if isinstance(weights, dict):
        if set(weights) != set(domains):
            missing, extra = sorted(set(domains) - set(weights)), sorted(set(weights) - set(domains))
            raise ConfigError(f"{key} must name exactly the domains {domains}; missing {missing}, unknown {extra}")
        weights = [weights[d] for d in domains]
    w = np.asarray(list(weights), dtype=np.float64)
    if w.shape != (len(domains),):
        raise ConfigError(f"{key} has {w.size} values but there are {len(domains)} domains {domains}")
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ConfigError(f"{key} must be finite and non-negative, got {w.tolist()}")
    if abs(w.sum() - 1) > 1e-3:
        raise ConfigError(f"{key} must sum to 1, got {w.sum():.6f} ({w.tolist()})")
    return w / w.sum()


RULES = {"paper": 0.0, "released": None}  # the gap's lower clamp: Algorithm 1 clamps at 0, the released code not


def update_weights(weights, losses, reference, eta: float = 1.0, smoothing: float = 0.0,
                   clamp_min: float | None = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The paper's dynamic batch loading step (Xia et al. 2024, Alg. 1), in log space:
    gap = max(loss - reference, clamp_min); alpha = log w + eta * gap; w' = softmax(alpha);
    then w' = (1 - smoothing) * w' + smoothing / k. Returns (new weights, gaps)."""
    w, loss, ref = (np.asarray(x, dtype=np.float64) for x in (weights, losses, reference))
    gap = loss - ref if clamp_min is None else np.maximum(loss - ref, clamp_min)
    alpha = np.log(np.maximum(w, 1e-300)) + eta * gap
    new = np.exp(alpha - alpha.max())
    new /= new.sum()
    new = (1 - smoothing) * new + smoothing / len(new)
    return new, gap
