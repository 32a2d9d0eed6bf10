"""Reference losses for dynamic batch loading: the per-domain loss the pruned model should reach.

Two ways to get them, both ending in a yaml snippet for a recipe's `data.dynamic.reference_losses`:

* the source model's own eval loss per domain (`source_reference_losses`): what the demo uses, and a
  sensible target when no family of smaller models exists;
* a scaling-law prediction (`predict_reference_losses`): as in Sheared-LLaMA (Xia et al. 2024, Sec. 2.2 and
  App. B), fit L(N) = a / N**b + c per domain to the eval losses of a family of models of several sizes N
  trained on the same data (the paper fit "the series of LLaMA2 models", all trained on 2T tokens, so the
  data term of Hoffmann et al.'s law is a constant folded into c) and evaluate it at the target's size.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
import yaml

from llmshearing.data.layout import check_domains, read_manifest, refuse_test
from llmshearing.errors import ConfigError
from llmshearing.model.hf import load_hf_config
from llmshearing.pruning.budget import parse_count
from llmshearing.pruning.shapes import param_count, PRESETS
from llmshearing.pruning.target import resolve_target

# The paper's reference losses, as released with the original code: princeton-nlp/LLM-Shearing,
# llmshearing/scripts/pruning.sh (and continue_pretrain.sh), `target_loss` lists commented
# "1.3b predicted loss from scaling law" / "2.7b predicted loss from scaling law" (the 2.7B one under
# `to_model == 3b` at commit 17c3026, `to_model == 2.7b` at 8185717, the `else` branch at cbf39a3; same values). There the domain order is set_names=[cc,github,book,stackexchange,wiki,arxiv,c4-rp];
# here they are keyed by our RedPajama domain names (cc -> common_crawl, wiki -> wikipedia, c4-rp -> c4)
# and listed in the order of `shards.REDPAJAMA_PROPORTIONS`. Per the paper (Sec. 2.2) they are the losses
# of a hypothetical LLaMA2 model of the target size, predicted by a scaling law fit per domain on the LLaMA2
# series: nats/token under the LLaMA-2 tokenizer on the authors' RedPajama eval split, so meaningful only
# for a LLaMA-2 source pruned on RedPajama.
PAPER_REFERENCE_LOSSES: dict[str, dict[str, float]] = {
    "sheared-llama-1.3b": {
        "common_crawl": 1.9643, "c4": 2.1251, "github": 0.7459, "book": 2.1393,
        "wikipedia": 1.7590, "arxiv": 1.4449, "stackexchange": 1.6117,
    },
    "sheared-llama-2.7b": {
        "common_crawl": 1.8712, "c4": 2.0328, "github": 0.6883, "book": 2.0325,
        "wikipedia": 1.6297, "arxiv": 1.3560, "stackexchange": 1.5353,
    },
}

B_MAX = 2.0  # the exponent b is searched in (0, B_MAX]
_B_GRID = np.geomspace(1e-3, B_MAX, 801)
# ---------------------------------------------------------------------------------------------- source model

def source_reference_losses(model_path: str, shards_root: str, gguf_file: str | None = None,
                            domains: list[str] | None = None, max_sequences: int | None = None,
                            batch_size: int = 4, progress: bool = False, remote: str | None = None,
                            split: str = "eval") -> dict[str, float]:
    """Per-domain eval loss (nats/token) of the model at `model_path` on the shards' `eval` split (with `remote`,
    `shards_root` is its cache: `data.remote.shards_root`); the `test` split is refused (never tuned on).

    Checked before any weights are read: the shards exist and hold the domains, every token id of the
    shards' tokenizer fits the model's embedding, and (when the model folder has a tokenizer) the shards
    were built with that tokenizer. Loaded and checked by `evaluate.check_model` / `evaluate.load_model`,
    the same loader `llmshearing eval` uses, so a reference loss and an eval loss mean the same thing.
    """
    from llmshearing.devices import resolve_device  # heavy: torch
    from llmshearing.eval.evaluate import check_model, domain_losses, load_model  # heavy: torch

    refuse_test(split, "reference losses")
    manifest = read_manifest(shards_root)
    domains = list(manifest["domains"]) if domains is None else list(domains)
    check_domains(manifest, shards_root, domains, split, key="domains", remote=remote)
    check_model(model_path, gguf_file, shards_root)
    device = resolve_device(None)
    model = load_model(model_path, gguf_file, "float32", device)
    return domain_losses(lambda ids: model(ids.to(device)).logits, shards_root, domains, split, max_sequences,
                         batch_size, progress, remote)


# ---------------------------------------------------------------------------------------------- scaling law

def _fit_fixed_b(x: np.ndarray, y: np.ndarray, b: float) -> tuple[float, float, float]:
    """(a, c, squared error) of the least-squares fit y ~ a * x**-b + c for a fixed b."""
    z = x ** -b
    zc = z - z.mean()
    a = float(zc @ (y - y.mean()) / (zc @ zc))
    c = float(y.mean() - a * z.mean())
    r = y - a * z - c
    return a, c, float(r @ r)


def fit_scaling_law(sizes: Sequence[float], losses: Sequence[float]) -> tuple[float, float, float]:
    """(a, b, c) of L(N) = a / N**b + c fit to the points (sizes[i], losses[i]) by least squares.

    For a fixed b the fit is linear in (a, c); b is searched on a log-spaced grid in (0, 2] and refined by
    golden-section search. Three points are interpolated exactly. Raises ConfigError for fewer than 3
    distinct sizes, non-positive sizes, losses that do not decrease with size (a <= 0), and data whose best
    exponent lies at the edge of the bracket (not a saturating power law).
    """
    if len(sizes) != len(losses):
        raise ConfigError(f"scaling-law fit: {len(sizes)} sizes but {len(losses)} losses")
    x = np.asarray([float(s) for s in sizes], dtype=np.float64)
    y = np.asarray([float(v) for v in losses], dtype=np.float64)
    if not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise ConfigError(f"scaling-law fit: model sizes must be positive parameter counts, got {list(sizes)}")
    if not np.all(np.isfinite(y)):
        raise ConfigError(f"scaling-law fit: losses must be finite numbers, got {list(losses)}")
    if len(np.unique(x)) < 3:
        raise ConfigError(f"scaling-law fit: L(N) = a/N^b + c has 3 parameters and needs models of at least 3 "
                          f"different sizes, got {len(np.unique(x))}; add the loss of another model size")
    scale = float(np.exp(np.log(x).mean()))  # fit in units of the geometric-mean size: well conditioned
    x = x / scale
    errors = np.array([_fit_fixed_b(x, y, b)[2] for b in _B_GRID])
    i = int(np.argmin(errors))
    lo, hi = _B_GRID[max(i - 1, 0)], _B_GRID[min(i + 1, len(_B_GRID) - 1)]
    inv_phi = (math.sqrt(5) - 1) / 2
    p, q = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
    fp, fq = _fit_fixed_b(x, y, p)[2], _fit_fixed_b(x, y, q)[2]
    while hi - lo > 1e-13 * hi:
        if fp <= fq:
            hi, q, fq = q, p, fp
            p = hi - inv_phi * (hi - lo)
            fp = _fit_fixed_b(x, y, p)[2]
        else:
            lo, p, fp = p, q, fq
            q = lo + inv_phi * (hi - lo)
            fq = _fit_fixed_b(x, y, q)[2]
    b = (lo + hi) / 2
    a, c, _ = _fit_fixed_b(x, y, b)
    points = ", ".join(f"({s:.4g}, {v:g})" for s, v in zip(sizes, losses))
    if not a > 0:
        raise ConfigError(f"scaling-law fit: the losses do not decrease with model size (fit a={a * scale ** b:.3g} <= 0) "
                          f"for the points (N, L) = {points}; check the sizes and losses belong together")
    if i == 0 or i == len(_B_GRID) - 1:
        raise ConfigError(f"scaling-law fit: the best exponent b is at the edge of (0, {B_MAX}] for the points "
                          f"(N, L) = {points}: the losses do not flatten like a power law a/N^b + c; "
                          f"check the losses or add more model sizes")
    return float(a * scale ** b), float(b), float(c)


def scaling_law(a: float, b: float, c: float, n: float) -> float:
    return a / n ** b + c


def load_fit_table(path: str) -> dict:
    """The fit input (yaml or json): {sizes: {model: N}, losses: {domain: {model: loss}}}."""
    if not os.path.isfile(path):
        raise ConfigError(f"--fit: '{path}' does not exist (expected a yaml/json file with 'sizes' and 'losses')")
    with open(path) as f:
        text = f.read()
    try:
        table = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"--fit: '{path}' is not valid {'json' if path.endswith('.json') else 'yaml'}: {e}") from None
    return table


def fit_table(table: Mapping | str, domains: list[str] | None = None) -> dict[str, tuple[float, float, float]]:
    """(a, b, c) per domain (input order, or `domains`) for a fit table or the path of one.

    The table: `sizes: {model: parameter count}` and `losses: {domain: {model: loss}}`.
    """
    if isinstance(table, str):
        table = load_fit_table(table)
    if not isinstance(table, Mapping) or not isinstance(table.get("sizes"), Mapping) \
            or not isinstance(table.get("losses"), Mapping):
        raise ConfigError("scaling-law table: expected a mapping with 'sizes: {model: parameter count}' and "
                          "'losses: {domain: {model: loss}}'")
    sizes = {str(name): parse_count(n, f"sizes.{name}") for name, n in table["sizes"].items()}
    if len(sizes) < 3:
        raise ConfigError(f"sizes: L(N) = a/N^b + c needs models of at least 3 sizes, got {len(sizes)} "
                          f"({', '.join(sizes) or 'none'}); add another model's parameter count and losses")
    losses = table["losses"]
    if not losses:
        raise ConfigError("losses: no domain given; expected 'losses: {domain: {model: loss}}'")
    if domains is not None:
        unknown = [d for d in domains if d not in losses]
        if unknown:
            raise ConfigError(f"domains {unknown} have no losses in the table (it has: {', '.join(map(str, losses))})")
    fits = {}
    for domain in (list(losses) if domains is None else domains):
        per = losses[domain]
        if not isinstance(per, Mapping):
            raise ConfigError(f"losses.{domain}: expected a mapping model -> loss, got {per!r}")
        for name, loss in per.items():
            if str(name) not in sizes:
                raise ConfigError(f"losses.{domain}.{name}: model '{name}' has no size; add it to 'sizes' "
                                  f"(its parameter count) or remove its losses")
            if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not loss > 0:
                raise ConfigError(f"losses.{domain}.{name}: expected a positive loss, got {loss!r}")
        if len(per) < 3:
            raise ConfigError(f"losses.{domain}: needs the losses of at least 3 model sizes, got {len(per)}; "
                              f"add the missing models' losses")
        try:
            fits[str(domain)] = fit_scaling_law([sizes[str(n)] for n in per], list(per.values()))
        except ConfigError as e:
            raise ConfigError(f"losses.{domain}: {e}") from None
    return fits


def predict_reference_losses(table: Mapping | str, target_params: float,
                             domains: list[str] | None = None) -> dict[str, float]:
    """Predicted loss per domain at `target_params` from the per-domain scaling-law fits of `table`
    (a mapping or a yaml/json path; see `fit_table`)."""
    n = parse_count(target_params, "target parameter count")
    return {d: scaling_law(a, b, c, n) for d, (a, b, c) in fit_table(table, domains).items()}


def target_param_count(target: str, source_model: str | None = None, gguf_file: str | None = None) -> float:
    """Parameters of a target given as a preset or an HF config (path), counted with `shapes.param_count`.

    A preset takes vocabulary, head_dim, biases and tying from the source model's config (`source_model`);
    a config path is counted on its own when no source is given.
    """
    if target not in PRESETS and not os.path.exists(target):
        raise ConfigError(f"--target '{target}' is neither a preset ({', '.join(PRESETS)}) nor an existing config path")
    if source_model is None:
        if target in PRESETS:
            raise ConfigError(f"--target {target} is a preset: give --model SOURCE_DIR too (its vocabulary and "
                              f"tied embeddings enter the count), or give --target-params N instead")
        source = load_hf_config(target)
    else:
        source = load_hf_config(source_model, gguf_file)
    return float(param_count(resolve_target(target, source), source))


# ---------------------------------------------------------------------------------------------- output

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null"}


def _yaml_key(name: str) -> str:
    name = str(name)
    plain = _PLAIN_KEY.fullmatch(name) and name.lower() not in _YAML_WORDS
    return name if plain else json.dumps(name)


def reference_snippet(losses: Mapping[str, float], provenance: str, notes: Sequence[str] = ()) -> str:
    """A yaml snippet for a recipe (`data.dynamic.reference_losses: <file>` reads it too):

        # reference losses: <provenance>
        reference_losses: {common_crawl: 1.9643, ...}

    Losses in the order given, 4 decimals; each of `notes` becomes one more comment line.
    """
    if not losses:
        raise ConfigError("no reference losses to write (no domain)")
    one_line = lambda s: " ".join(str(s).split())  # noqa: E731
    lines = [f"# reference losses: {one_line(provenance)}"] + [f"#   {one_line(n)}" for n in notes]
    body = ", ".join(f"{_yaml_key(d)}: {float(v):.4f}" for d, v in losses.items())
    return "\n".join(lines + [f"reference_losses: {{{body}}}"]) + "\n"


def source_snippet(model_path: str, shards_root: str, gguf_file: str | None = None,
                   domains: list[str] | None = None, max_sequences: int | None = None, batch_size: int = 4,
                   progress: bool = False, remote: str | None = None) -> str:
    """`source_reference_losses` as a snippet, with where the numbers come from."""
    losses = source_reference_losses(model_path, shards_root, gguf_file, domains, max_sequences, batch_size, progress,
                                     remote)
    model = f"{model_path} (gguf {gguf_file})" if gguf_file else model_path
    amount = "all sequences" if max_sequences is None else f"first {max_sequences} sequences per domain"
    return reference_snippet(losses, f"mean next-token loss (nats/token) of the source model {model} on the "
                                     f"'eval' split of {remote or shards_root} ({amount})")


def fit_snippet(table_path: str, target_params: float, target_label: str | None = None,
                domains: list[str] | None = None) -> str:
    """`predict_reference_losses` as a snippet: the fit input, the target size, and each domain's fit."""
    table = load_fit_table(table_path)
    n = parse_count(target_params, "target parameter count")
    fits = fit_table(table, domains)
    losses = {d: scaling_law(a, b, c, n) for d, (a, b, c) in fits.items()}
    counts = {name: parse_count(v) for name, v in table["sizes"].items()}
    sizes = ", ".join(f"{name} {v:.3g}" for name, v in counts.items())
    target = f"{n:.4g} parameters" + (f" ({target_label})" if target_label else "")
    notes = [f"{d}: a={a:.6g} b={b:.6g} c={c:.6g}" + (" (c < 0: a negative asymptote, check the losses)" if c < 0 else "")
             for d, (a, b, c) in fits.items()]
    if not min(counts.values()) <= n <= max(counts.values()):
        notes.append(f"the target size is outside the fitted sizes [{min(counts.values()):.3g}, "
                     f"{max(counts.values()):.3g}]: the losses are extrapolated")
    return reference_snippet(losses, f"scaling law L(N) = a / N**b + c fit per domain to {table_path} "
                                     f"(sizes: {sizes}), predicted at N = {target}", notes)
