"""Guards that stop a run cleanly instead of wasting or losing it, one job each: RunGuard (every rank sees the run
folder; the run config in every checkpoint), StopOnNonFinite (a NaN/inf loss or gradient stops the run before the
optimizer applies it), StopOnSignal (SIGTERM / Ctrl-C checkpoint before exiting) and RanksAgree (every evaluation
checks that all ranks still hold the same replicated parameters). `guards()` builds them in order."""
from __future__ import annotations

import glob
import os
import signal
import threading
import uuid

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmshearing.checkpoint_files import save_now
from llmshearing.compat import unwrap
from llmshearing.errors import ConfigError
from llmshearing.io import append_jsonl, atomic_write_text


class NonFiniteLossError(RuntimeError):
    """The loss or a gradient became NaN/inf; the state from before the offending batch was saved."""


class Preempted(Exception):
    """Raised on every rank after the SIGTERM / SIGINT checkpoint: ends `fit` at once (no fit-end evaluation,
    which would change the domain weights after the checkpoint, and no export)."""

    def __init__(self, batch: int, path: str, signum: int = signal.SIGTERM):
        super().__init__(f"stopped by {signal.Signals(signum).name} after batch {batch}; checkpoint {path}")
        self.batch, self.path, self.signum = batch, path, signum


class RanksDisagreeError(RuntimeError):
    """Replicated parameters differ across ranks (they must not under DDP)."""


def _flag(state: State, value: float) -> int:
    """The largest `value` over all ranks (one tiny all-reduce)."""
    t = state.device.tensor_to_device(torch.tensor([float(value)]))
    dist.all_reduce(t, reduce_operation="MAX")
    return int(t.item())


def _finite_loss(loss) -> bool:
    values = loss.values() if isinstance(loss, dict) else (loss if isinstance(loss, (list, tuple)) else [loss])
    return all(bool(torch.isfinite(v.detach()).all()) for v in values)


class RunGuard(Callback):
    """The run folder's guard: at init every rank must see the folder rank 0 writes (check_shared), and every
    checkpoint carries the resolved run config (yaml) in its state (callbacks, RunGuard, run_config), which `llmshearing
    export` and resumes read. Stopping on NaN, on a signal and checking the ranks agree are callbacks of their own."""

    def __init__(self, folder: str | None, run_config: str | None = None):
        self.folder, self.run_config = folder, run_config

    def init(self, state: State, logger: Logger) -> None:
        if self.folder:  # before Composer looks for a checkpoint to resume from
            check_shared(self.folder)

    def state_dict(self) -> dict:
        return {"run_config": self.run_config}

    def load_state_dict(self, state: dict) -> None:
        pass  # the config of the resuming run is the one that counts (the run folder's binding checked it)


class StopOnNonFinite(Callback):
    """After every backward, a NaN/inf loss or gradient on any rank saves the state as it was before this batch
    (the weights are untouched: the optimizer has not stepped) and raises `NonFiniteLossError`. Gradients are not
    checked under amp_fp16, whose grad scaler skips inf steps. Listed before gradient clipping, which would hide
    an inf gradient."""

    def __init__(self, folder: str | None):
        self.folder = folder

    def after_backward(self, state: State, logger: Logger) -> None:
        bad = 2 if not _finite_loss(state.loss) else 0
        if not bad and state.precision.value != "amp_fp16":
            grads = [p.grad for p in state.model.parameters() if p.grad is not None]
            bad = 1 if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) else 0
        bad = _flag(state, bad)
        if not bad:
            return
        done = int(state.timestamp.batch)
        where = "no checkpoint was written (save_folder is not set)"
        if self.folder:
            where = f"the state after batch {done} (before this one) is saved as {save_now(state, self.folder)}"
        raise NonFiniteLossError(
            f"non-finite {'loss' if bad == 2 else 'gradient'} in batch {done + 1} (loss on rank "
            f"{dist.get_global_rank()}: {_describe(state.loss)}); the optimizer did not "
            f"step, {where}. Resume from it with a lower optimizer.lr (or pruning.mask_lr / lambda_lr), or check the "
            f"data of that batch")


class StopOnSignal(Callback):
    """SIGTERM (a preempted or timed-out job) or SIGINT (Ctrl-C) sets a flag; at the end of the current batch every
    rank agrees on it, saves a checkpoint (and points `latest` at it, for autoresume) and raises `Preempted`."""

    def __init__(self, folder: str):
        self.folder = folder
        self._signalled = 0  # the stop signal received (SIGTERM or SIGINT), 0 for none
        self._previous = {}

    def fit_start(self, state: State, logger: Logger) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):  # Ctrl-C ends a run like a scheduler's SIGTERM
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._signalled = signum  # acted on at the end of the batch, where a checkpoint is consistent

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        """After every callback's batch_end (so the stopped batch's log rows are written and saved with it)."""
        signum = _flag(state, self._signalled)
        if not signum:
            return
        batch = int(state.timestamp.batch)
        path = save_now(state, self.folder)
        if dist.get_global_rank() == 0:
            print(f"{signal.Signals(signum).name}: saved {path} after batch {batch}; resume with autoresume=true "
                  f"(same save_folder and run_name) or load_path={path}", flush=True)
        raise Preempted(batch, path, signum)

    def close(self, state: State, logger: Logger) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class RanksAgree(Callback):
    """After every evaluation all ranks must hold identical replicated parameters: every parameter under DDP; under
    FSDP, which shards the decoder by design, the masks and multipliers (the part kept whole on every rank)."""

    def __init__(self, folder: str | None):
        self.folder = folder

    def eval_after_all(self, state: State, logger: Logger) -> None:
        model = unwrap(state.model)
        replicated = model if not state.fsdp_enabled else model.l0
        if dist.get_world_size() == 1 or replicated is None:
            return
        named = list(replicated.named_parameters())
        sums = [float(p.detach().double().sum()) for _, p in named]
        every = dist.all_gather_object(sums)
        if any(s != every[0] for s in every):
            names = [n for (n, _), *vals in zip(named, *every) if len(set(vals)) > 1]
            raise RanksDisagreeError(f"after batch {int(state.timestamp.batch)} ranks hold different values of "
                                     f"{names[:5]}{'...' if len(names) > 5 else ''}")
        logger.log_metrics({"ranks/agreeing": len(every)})
        if self.folder and dist.get_global_rank() == 0:
            append_jsonl(os.path.join(self.folder, "rank_checks.jsonl"),
                         {"batch": int(state.timestamp.batch), "ranks": len(every), "tensors": len(sums)})


def guards(folder: str | None, run_config: str | None, stop_on_nonfinite: bool, save_on_sigterm: bool) -> list:
    """The run's guards, in the order they must run: the folder check and config record, the NaN stop (before any
    clipping), the signal stop (only with a folder to save in), the ranks' agreement."""
    built = [RunGuard(folder, run_config)]
    if stop_on_nonfinite:
        built.append(StopOnNonFinite(folder))
    if save_on_sigterm and folder:
        built.append(StopOnSignal(folder))
    return built + [RanksAgree(folder)]


def _describe(loss) -> str:
    if isinstance(loss, dict):
        return ", ".join(f"{k}={float(v.detach().float().mean()):.4g}" for k, v in loss.items())
    return f"{float(torch.as_tensor(loss).detach().float().mean()):.4g}"


SHARED_NAME = ".shared-check"  # <name>-<token>: written by rank 0 at start, read by every rank (check_shared)


def check_shared(folder: str) -> None:
    """Every rank sees the run folder rank 0 writes (all ranks call this once the process group exists, before
    a checkpoint is loaded). On several nodes save_folder must be one folder on a filesystem they share: each rank
    writes its own shard of a sharded checkpoint there and autoresume looks for the `latest` link there, so a
    node-local folder would leave every checkpoint incomplete and make the nodes disagree on resuming. The file
    has a new name every time, so no node can answer from a cached lookup (NFS caches names found missing)."""
    if dist.get_world_size() == 1:
        return
    token = [uuid.uuid4().hex if dist.get_global_rank() == 0 else None]
    if dist.get_global_rank() == 0:
        for stale in glob.glob(os.path.join(folder, SHARED_NAME + "-*")):  # a run killed during its check
            os.remove(stale)
        atomic_write_text(os.path.join(folder, f"{SHARED_NAME}-{token[0]}"), token[0])
    dist.broadcast_object_list(token, src=0)
    path = os.path.join(folder, f"{SHARED_NAME}-{token[0]}")
    try:
        with open(path) as f:
            seen = f.read() == token[0]
    except OSError:
        seen = False
    nodes = dist.all_gather_object((dist.get_node_rank(), seen))
    if dist.get_global_rank() == 0:
        os.remove(path)
    apart = sorted({node for node, ok in nodes if not ok})
    if apart:
        raise ConfigError(f"save_folder '{folder}' is not the folder rank 0 writes on node(s) {apart}: give every "
                          f"node the same save_folder on a filesystem they share (NFS, Lustre, ...); sharded "
                          f"checkpoints and autoresume need it (docs/multinode.md)")
