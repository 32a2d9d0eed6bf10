"""Evaluation of model folders: the one place outside training that computes per-domain loss, and `llmshearing eval`.

`domain_loss_stats` / `domain_losses` read each domain's `eval` split, or the `split` given (final numbers: `test`, see
`llmshearing.data.layout`), and return the
mean next-token cross-entropy in nats per predicted token. The reference losses, the demo and `llmshearing eval`
use them, so every number of the project about "loss on domain d" means the same thing.

`check_model` + `load_model` are the one loader of an HF model folder for evaluation (reference losses use it
too): every check that needs no weights first, then `AutoModelForCausalLM.from_pretrained`.
`evaluate_models` adds zero-shot multiple-choice accuracy through lm-evaluation-harness (the `eval` extra) on
tasks defined by local files (`tasks/` ships one), passing the loaded model object so nothing is fetched.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import version

import numpy as np
import torch
import torch.nn.functional as F

from llmshearing.data.tokenizer import check_tokenizer, load_tokenizer
from llmshearing.devices import dtype_of, resolve_device
from llmshearing.errors import ConfigError
from llmshearing.data.layout import check_domains, open_split, read_manifest, tokens_of, check_positions
from llmshearing.data.remote import shards_root


def _positive_int(value, key: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return int(value)


@torch.no_grad()
def domain_loss_stats(logits_fn: Callable[[torch.Tensor], torch.Tensor], root: str, domains: list[str] | None = None,
                      split: str = "eval", max_sequences: int | None = None, batch_size: int = 4,
                      progress: bool = False, remote: str | None = None) -> dict[str, dict]:
    """Per domain on `split` of the shards at `root`: {"loss": mean next-token cross-entropy (nats/token),
    "tokens": predicted tokens it averages over, "sequences": sequences read}.

    `logits_fn(input_ids)` maps a LongTensor (B, T) to logits (B, T, V) (on any device). Every sequence
    contributes its T-1 predicted positions; the mean is over all of them (a token-weighted mean).
    `domains` defaults to all domains of the manifest, in its order; `max_sequences` takes the first N
    sequences of each domain (all when None). With `remote`, `root` is its cache (`remote.shards_root`) and
    shard files are fetched on first read.
    """
    manifest = read_manifest(root)
    domains = list(manifest["domains"]) if domains is None else list(domains)
    if not domains:
        raise ConfigError(f"domains: no domain to evaluate in '{root}'")
    check_domains(manifest, root, domains, split, key="domains", remote=remote)
    max_sequences = _positive_int(max_sequences, "max_sequences", allow_none=True)
    batch_size = _positive_int(batch_size, "batch_size")

    bar = None
    if progress:
        from tqdm.auto import tqdm  # heavy: tqdm, only with a progress bar

        total = sum(min(len(open_split(root, d, split, remote)), max_sequences or 10**18) for d in domains)
        bar = tqdm(total=total, desc=f"loss on '{split}'", unit="seq")
    losses = {}
    try:
        for name in domains:
            dataset = open_split(root, name, split, remote)
            n = len(dataset) if max_sequences is None else min(len(dataset), max_sequences)
            total, count = 0.0, 0
            for start in range(0, n, batch_size):
                ids = torch.from_numpy(np.stack([tokens_of(dataset[i]) for i in range(start, min(n, start + batch_size))]))
                if ids.shape[1] < 2:
                    raise ConfigError(f"shards of '{name}/{split}' in '{root}' hold sequences of {ids.shape[1]} "
                                      f"token(s); next-token loss needs at least 2")
                logits = logits_fn(ids)
                vocab = logits.shape[-1]
                if int(ids.max()) >= vocab:
                    raise ConfigError(f"domain '{name}' has token id {int(ids.max())} but the model predicts only "
                                      f"{vocab} tokens: the shards were built with another tokenizer; rebuild them "
                                      f"with the model's tokenizer")
                targets = ids[:, 1:].to(logits.device)
                nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), targets.reshape(-1), reduction="sum")
                total += float(nll.double())
                count += targets.numel()
                if bar is not None:
                    bar.update(len(ids))
            losses[name] = {"loss": total / count, "tokens": count, "sequences": n}
    finally:
        if bar is not None:
            bar.close()
    return losses


def domain_losses(logits_fn: Callable[[torch.Tensor], torch.Tensor], root: str, domains: list[str] | None = None,
                  split: str = "eval", max_sequences: int | None = None, batch_size: int = 4,
                  progress: bool = False, remote: str | None = None) -> dict[str, float]:
    """Mean next-token cross-entropy (nats/token) per domain: the "loss" of `domain_loss_stats`."""
    stats = domain_loss_stats(logits_fn, root, domains, split, max_sequences, batch_size, progress, remote)
    return {d: s["loss"] for d, s in stats.items()}


def perplexities(losses: Mapping[str, float]) -> dict[str, float]:
    """Token perplexity exp(loss) per domain (losses in nats/token)."""
    return {d: math.exp(v) for d, v in losses.items()}


def markdown_table(rows: Mapping[str, Mapping[str, float]], columns: list[str] | None = None, fmt: str = "{:.2f}",
                   label: str = "model", missing: str = "-") -> str:
    """A markdown table with one row per model (`rows` = model name -> {domain: value}).

    `columns` defaults to the domains in order of first appearance; a model without a value for a column
    shows `missing`. `fmt` formats every number; a string value is shown as it is (rows of mixed units).
    """
    if columns is None:
        columns = list(dict.fromkeys(d for per in rows.values() for d in per))
    lines = [f"| {label} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    show = lambda v: v if isinstance(v, str) else fmt.format(v)  # noqa: E731
    for name, per in rows.items():
        cells = [show(per[c]) if c in per and per[c] is not None else missing for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- model folders

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
EVAL_EXTRA = "pip install -e '.[eval]'"


def model_location(path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder, GGUF file name or None) of a model given as a folder (with `gguf_file` inside) or a .gguf file."""
    if gguf_file is None and path.endswith(".gguf") and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    return path, gguf_file


def check_model(path: str, gguf_file: str | None = None, shards_root: str | None = None,
                need_tokenizer: bool = False):
    """Every check of a model folder that needs no weights; returns (config, tokenizer or None).

    The folder exists and holds a config (or the GGUF file); its tokenizer, when it has one, is the one the
    shards were built with, and the shards' token ids fit the embedding. `need_tokenizer`: refuse a folder
    without a tokenizer (lm-eval tasks need one).
    """
    from llmshearing.model.loading import check_model_folder  # heavy: transformers

    config = check_model_folder(path, gguf_file, key="model")
    try:  # the folder's own tokenizer, when it has one; else only the vocabulary size is checked
        tokenizer = load_tokenizer(path, gguf_file)
    except ConfigError as e:
        if need_tokenizer:
            raise ConfigError(f"--tasks need the model's tokenizer: {e}") from None
        tokenizer = None
    if shards_root is not None:
        check_tokenizer(shards_root, tokenizer, config.vocab_size, path)
        check_positions(shards_root, config, path)
    return config, tokenizer


def load_model(path: str, gguf_file: str | None = None, dtype: str | torch.dtype = "float32",
               device: str | None = None):
    """The model of `path` as transformers loads it (`AutoModelForCausalLM.from_pretrained`), in eval mode on
    `device` (see `resolve_device`). Run `check_model` first: this reads the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy: transformers

    from llmshearing.model.hf import reference_attention  # heavy: transformers

    if isinstance(dtype, str):
        dtype = dtype_of(dtype)
    device = resolve_device(device)
    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    try:  # Gemma with its eager attention: transformers' SDPA path drops Gemma 2's soft-cap
        attention = reference_attention(AutoConfig.from_pretrained(path, **gguf))
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, **gguf, **attention)
    except OSError as e:  # e.g. a folder with a config but no weights
        raise ConfigError(f"cannot load the model weights in '{path}': {e}") from None
    return model.to(device).eval()


def parameter_count(model) -> int:
    """Parameters of `model`, a tied embedding counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------------------------------- lm-eval tasks

def task_manager(tasks: Sequence[str], include_paths: Sequence[str] = (), lm_eval_tasks: bool = False):
    """An lm-eval TaskManager that knows every task of `tasks`, or a ConfigError naming the unknown ones.

    It indexes the shipped tasks (`tasks/`) and `include_paths` only; lm-eval's own catalogue
    (thousands of yamls, ~16 s to index, datasets from the HF hub) only with `lm_eval_tasks`.
    """
    try:
        from lm_eval.tasks import TaskManager  # optional: the eval extra
    except ImportError:
        raise ConfigError(f"--tasks needs lm-evaluation-harness, which is not installed; install the eval "
                          f"extra: {EVAL_EXTRA}") from None
    for p in include_paths:
        if not os.path.isdir(p):
            raise ConfigError(f"--include-path '{p}' is not a folder (expected a folder of lm-eval task yamls)")
    paths = [TASKS_DIR, *[os.path.abspath(p) for p in include_paths]]
    with _quiet_lm_eval():
        manager = TaskManager(include_path=paths, include_defaults=lm_eval_tasks)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            known = ", ".join(manager.all_tasks) if not lm_eval_tasks else f"{len(manager.all_tasks)} tasks"
            hint = "" if lm_eval_tasks else ("; lm-eval's own tasks (their data come from the HF hub) need "
                                             "--lm-eval-tasks")
            raise ConfigError(f"--tasks: unknown task(s) {', '.join(unknown)} (known: {known}); a task of your "
                              f"own goes in a yaml in a folder given by --include-path{hint}")
        for name in tasks:  # build each task once now: its yaml, helpers and data fail here, before any weights
            try:
                manager.load_task_or_group([name])
            except Exception as e:  # noqa: BLE001 - a task's yaml, helper or data fail in many ways; say which task
                hint = (" (its data come from the HF hub, which this machine cannot reach)"
                        if isinstance(e, ConnectionError) else "")
                raise ConfigError(f"--tasks: cannot build task '{name}'{hint}: {type(e).__name__}: {e}") from None
    return manager


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval's logger at ERROR inside the block: its warnings about a model object passed instead of a name,
    custom datasets and num_fewshot overrides are expected here."""
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def run_tasks(model, tokenizer, tasks: Sequence[str], manager, batch_size: int = 4, num_fewshot: int | None = 0,
              limit: int | None = None) -> dict[str, dict]:
    """Task metrics of the loaded `model` through lm-eval's HFLM (the model object: no hub access).

    Per task: every numeric metric lm-eval reports ("acc", "acc_stderr", "acc_norm", ... ; a metric of a
    filter other than "none" as "metric/filter") and "items", the documents scored.
    """
    import lm_eval  # optional: the eval extra
    from lm_eval.models.huggingface import HFLM  # optional: the eval extra

    with _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                                      limit=limit, log_samples=False)
    results = {}
    for name, metrics in out["results"].items():
        entry = {"items": out.get("n-samples", {}).get(name, {}).get("effective")}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt and isinstance(value, (int, float)) and not isinstance(value, bool):
                entry[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
        results[name] = entry
    return results


# ---------------------------------------------------------------------------------------------- llmshearing eval

def evaluate_models(models: Sequence[str], shards: str | None = None, gguf_file: str | None = None,
                    domains: list[str] | None = None, max_sequences: int | None = None, batch_size: int = 4,
                    dtype: str = "float32", device: str | None = None, tasks: Sequence[str] = (),
                    include_paths: Sequence[str] = (), lm_eval_tasks: bool = False, num_fewshot: int = 0,
                    limit: int | None = None, progress: bool = False, remote: str | None = None,
                    local: str | None = None, split: str = "test") -> dict:
    """Per-domain loss/perplexity on the shards' `split` (`test`: final numbers, the default; `eval`: the split that
    steers training, what its evals and dynamic loading saw) and task accuracies of each model folder. The
    shards are a folder (`shards`) or object storage read through a cache (`remote` + `local`).

    Every input is checked before any weights are read (so a bad call costs seconds and writes nothing);
    then the models are loaded and evaluated one at a time.
    """
    t_start = time.time()
    if not models:
        raise ConfigError("give at least one model folder")
    if shards is None and remote is None and not tasks:
        raise ConfigError("nothing to evaluate: give --shards DIR or --remote URI --local DIR (per-domain "
                          "perplexity) and/or --tasks NAMES")
    if shards is None and remote is None and (domains is not None or max_sequences is not None):
        raise ConfigError("--domains and --max-sequences select shard sequences; give --shards DIR too")
    batch_size = _positive_int(batch_size, "--batch-size")
    max_sequences = _positive_int(max_sequences, "--max-sequences", allow_none=True)
    if split not in ("test", "eval"):
        raise ConfigError(f"--split must be test (final numbers) or eval (the split that steers training), got "
                          f"'{split}'")
    limit = _positive_int(limit, "--limit", allow_none=True)
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be a non-negative integer, got {num_fewshot!r}")
    dtype_of(dtype)
    device = resolve_device(device)
    given_shards = shards if remote is None else f"{remote} (cache {local})"
    shards = shards_root(shards, remote, local, ("--shards", "--remote", "--local"))
    if shards is not None:
        manifest = read_manifest(shards)
        domains = list(manifest["domains"]) if domains is None else list(domains)
        if not domains:
            raise ConfigError(f"--domains: no domain to evaluate in '{shards}'")
        check_domains(manifest, shards, domains, split, key="--domains", remote=remote)
    located = [model_location(m, gguf_file) for m in models]
    checked = [check_model(path, gguf, shards, need_tokenizer=bool(tasks)) for path, gguf in located]
    manager = task_manager(tasks, include_paths, lm_eval_tasks) if tasks else None

    results = []
    for given, (path, gguf), (_, tokenizer) in zip(models, located, checked):
        times, t0 = {}, time.time()
        model = load_model(path, gguf, dtype, device)
        times["load"] = time.time() - t0
        entry = {"model": given, "path": path, "gguf_file": gguf, "parameters": parameter_count(model)}
        if shards is not None:
            t = time.time()
            stats = domain_loss_stats(lambda ids: model(ids.to(device)).logits, shards, domains, split,
                                      max_sequences, batch_size, progress, remote)
            times["perplexity"] = time.time() - t
            entry["domains"] = {d: {"loss": s["loss"], "ppl": math.exp(s["loss"]), "tokens": s["tokens"],
                                    "sequences": s["sequences"]} for d, s in stats.items()}
            entry["tokens_evaluated"] = sum(s["tokens"] for s in stats.values())
        if tasks:
            t = time.time()
            entry["tasks"] = run_tasks(model, tokenizer, tasks, manager, batch_size, num_fewshot, limit)
            times["tasks"] = time.time() - t
        times["total"] = time.time() - t0
        entry["seconds"] = times
        results.append(entry)
        del model
    report = {"shards": given_shards, "split": split if shards is not None else None, "domains": domains,
              "max_sequences": max_sequences, "batch_size": batch_size, "dtype": dtype, "device": device,
              "tasks": list(tasks), "num_fewshot": num_fewshot if tasks else None, "limit": limit,
              "models": results, "seconds": time.time() - t_start}
    if tasks:
        report["lm_eval_version"] = version("lm_eval")
    return report


def _model_labels(report: dict) -> list[str]:
    """Column names: the models as given, made unique."""
    labels = []
    for m in report["models"]:
        label = m["model"] + (f" ({m['gguf_file']})" if m["gguf_file"] and not m["model"].endswith(".gguf") else "")
        labels.append(label if label not in labels else f"{label} #{len(labels) + 1}")
    return labels


def report_table(report: dict) -> str:
    """The markdown table of `evaluate_models`: a column per model, a row per number."""
    labels = _model_labels(report)
    rows: dict[str, dict[str, str]] = {}

    def put(row: str, label: str, text: str) -> None:
        rows.setdefault(row, {})[label] = text

    for label, m in zip(labels, report["models"]):
        put("parameters", label, f"{m['parameters']:,}")
        if m.get("domains"):
            put("shards split", label, report["split"])
        for d, s in m.get("domains", {}).items():
            put(f"ppl {d}", label, f"{s['ppl']:.2f}")
        for d, s in m.get("domains", {}).items():
            put(f"loss {d} (nats/token)", label, f"{s['loss']:.4f}")
        if "tokens_evaluated" in m:
            put("tokens evaluated", label, f"{m['tokens_evaluated']:,}")
        for task, r in m.get("tasks", {}).items():
            for metric in ("acc", "acc_norm"):
                if metric in r:
                    err = r.get(f"{metric}_stderr")
                    put(f"{task} {metric}", label, f"{r[metric]:.3f}" + (f" ± {err:.3f}" if err is not None else ""))
            if r.get("items") is not None:
                put(f"{task} items", label, str(r["items"]))
        put("seconds", label, f"{m['seconds']['total']:.1f}")
    return markdown_table(rows, columns=labels, label="metric")
