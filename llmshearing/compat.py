"""Every use of a private Composer / torch / transformers / multiprocessing API, in one place.

Each shim names what it relies on and checks, when it is used, that the installed package still has
it (`require`): the pinned versions (constraints.txt) are the ones it was written against. A failed
check raises `CompatError` naming the shim and both versions: fix the shim here, never around it.
`check_all()` runs every check (tests/test_packaging.py), so an upgrade that breaks one fails the suite.
"""
from __future__ import annotations

import atexit
import contextlib
import inspect
import multiprocessing
import os
import signal
import warnings
from importlib.metadata import version

import torch

from llmshearing.io import atomic_file

PINNED = {"mosaicml": "0.32.1", "torch": "2.7.0", "transformers": "4.53.3"}


class CompatError(RuntimeError):
    """A private API that a shim relies on is gone or changed in the installed package."""


def require(ok: bool, shim: str, what: str, package: str) -> None:
    if not ok:
        raise CompatError(f"{shim}: {what} is gone or changed in {package} {version(package)} (written for "
                          f"{PINNED[package]}); update llmshearing/compat.py for this version")


# -- Composer: atomic checkpoint writes -----------------------------------------------------------------
def _composer_checkpoint_module():
    from composer.utils import checkpoint  # heavy: composer

    require(callable(getattr(checkpoint, "_write_checkpoint_file", None)), "install_atomic_writes",
            "composer.utils.checkpoint._write_checkpoint_file", "mosaicml")
    return checkpoint


def _atomic_write_checkpoint_file(state_dict, filename: str) -> None:
    with atomic_file(filename, "wb") as f:
        torch.save(state_dict, f)


def install_atomic_writes() -> None:
    """Route Composer's plain `.pt` checkpoint writes through a temporary file + fsync + rename.

    Composer 0.32 writes a checkpoint in place and has no hook for this, so its module-level writer is
    replaced process-wide (idempotent). Compressed and tar checkpoints keep Composer's writer.
    """
    checkpoint = _composer_checkpoint_module()
    original = checkpoint._write_checkpoint_file
    if getattr(original, "_llmshearing_atomic", False):
        return

    def write(state_dict, filename: str) -> None:
        if filename.endswith(".pt"):
            _atomic_write_checkpoint_file(state_dict, filename)
        else:
            original(state_dict, filename)

    write._llmshearing_atomic = True
    checkpoint._write_checkpoint_file = write


# -- Composer: autoresume on a save_folder shared by several nodes ----------------------------------------------
def _composer_dist_module():
    from composer.utils import dist  # heavy: composer

    require(all(callable(getattr(dist, n, None)) for n in ("get_node_signal_file_name", "get_node_rank")),
            "per_node_signal_files", "composer.utils.dist.get_node_signal_file_name / get_node_rank", "mosaicml")
    return dist


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside Composer's DDP wrapper (Composer wraps state.model in torch's DistributedDataParallel for
    DDP, and leaves it unwrapped under FSDP and on one process)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def per_node_signal_files() -> None:
    """Name the signal files of Composer's collective waits after this node (process-wide, idempotent).

    Composer 0.32 broadcasts rank 0's name (`._signal_file_node0_<random>`); at autoresume every node's local
    rank 0 writes that file into save_folder and then removes it. On a save_folder shared by the nodes (what
    sharded checkpoints and autoresume need) the nodes write and remove the same file, and the node that removes
    it second fails at start with FileNotFoundError. A name per node keeps the wait within the node, as meant.
    """
    dist = _composer_dist_module()
    original = dist.get_node_signal_file_name
    if getattr(original, "_llmshearing_per_node", False):
        return

    def per_node(rng=None) -> str:
        name = original(rng)  # a collective: every rank calls it, as before
        prefix = "._signal_file_node"
        if not name.startswith(prefix):
            return name
        return f"{prefix}{dist.get_node_rank()}_{name[len(prefix):].split('_', 1)[-1]}"

    per_node._llmshearing_per_node = True
    dist.get_node_signal_file_name = per_node


# -- Composer: the layout of a checkpoint -----------------------------------------------------------------
def is_sharded_checkpoint(path: str) -> bool:
    """A sharded (torch.distributed.checkpoint) checkpoint is a folder holding `.metadata` and `__<rank>_0.distcp`
    (whether every rank's file is there: `sharded_checkpoint_problem`)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def sharded_checkpoint_problem(path: str) -> str | None:
    """Why a sharded checkpoint folder is not whole, or None. DCP writes `.metadata` last, but it lists the storage
    file of every rank (with the byte range of each tensor), so a folder that lost a rank's file, or holds a
    truncated one, still has it: each listed file must be there and long enough."""
    if not is_sharded_checkpoint(path):
        return "it has no .metadata (its save never finished)"
    from torch.distributed.checkpoint import FileSystemReader  # heavy: torch

    try:
        storage = FileSystemReader(path).read_metadata().storage_data
        need = {}
        for info in storage.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # noqa: BLE001 - a damaged .metadata fails in pickle in many ways
        return f"its .metadata does not read ({type(e).__name__})"
    for rel, size in sorted(need.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"'{rel}', listed in its .metadata, is missing (a rank's file was lost)"
        if os.path.getsize(file) < size:
            return f"'{rel}' is truncated ({os.path.getsize(file):,} bytes, its .metadata needs {size:,})"
    return None


def _check_layout(ckpt, path: str) -> None:
    require(isinstance(ckpt, dict) and isinstance(ckpt.get("state"), dict) and "model" in ckpt["state"],
            "checkpoint_state", f"the checkpoint layout {{'state': {{'model': ...}}}} (read from {path})", "mosaicml")


def _dcp_load_everything():
    from torch.distributed.checkpoint import state_dict_loader  # heavy: torch

    load = getattr(state_dict_loader, "_load_state_dict_from_keys", None)
    require(callable(load), "checkpoint_state", "torch.distributed.checkpoint.state_dict_loader."
            "_load_state_dict_from_keys", "torch")
    return load


def checkpoint_state(path: str) -> dict:
    """The whole `state` dict of a Composer checkpoint, monolithic (`.pt` file) or sharded (a folder), read in one
    process: model (teacher included), optimizer, 'timestamp', 'dataset_state', callbacks... For tests and run
    summaries; an export reads only the model through `CheckpointModel`. Composer has no public reader for a
    checkpoint outside a Trainer; a sharded one is read by DCP's own single-process loader, in memory (no
    temporary file)."""
    if is_sharded_checkpoint(path):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            ckpt = _dcp_load_everything()({"state"}, checkpoint_id=path)  # every key under 'state' (not 'rng')
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    _check_layout(ckpt, path)
    return ckpt["state"]


class CheckpointModel:
    """The `state.model` tensors of a Composer checkpoint (ComposerLM names: 'model.model.layers.0...',
    'l0.lambdas', 'teacher....'), each read when asked for, and its callbacks' small values.

    Nothing else is read: a monolithic `.pt` is memory-mapped (torch.load(mmap=True)), so only the pages of the
    tensors asked for are ever read from disk; a sharded checkpoint is read through DCP's metadata, one tensor
    per `dcp.load` of exactly that key (the optimizer's and the teacher's entries are never touched), in memory.
    """

    def __init__(self, path: str):
        self.path = path
        self.sharded = is_sharded_checkpoint(path)
        if self.sharded:
            from torch.distributed.checkpoint import FileSystemReader  # heavy: torch.distributed, sharded only

            metadata = FileSystemReader(path).read_metadata()
            self._meta = metadata.state_dict_metadata
            # DCP flattens {'state': {'model': {name: tensor}}} into 'state.model.<name>'; planner_data keeps the path
            self._fqn = {p[2]: fqn for fqn, p in metadata.planner_data.items()
                         if len(p) == 3 and tuple(p[:2]) == ("state", "model")}
            self._objects = {tuple(p): fqn for fqn, p in metadata.planner_data.items()}
            require(bool(self._fqn), "CheckpointModel", f"the sharded layout 'state.model.<name>' (read from {path})",
                    "mosaicml")
            self.names = list(self._fqn)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            _check_layout(ckpt, path)
            self._state = ckpt["state"]
            self._model = {k.removeprefix("module."): v for k, v in self._state["model"].items()}
            self.names = list(self._model)

    def _dcp_load(self, fqn: str, value):
        from torch.distributed.checkpoint import FileSystemReader, load  # heavy: torch

        from torch.distributed.checkpoint.api import CheckpointException  # heavy: torch

        holder = {fqn: value}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                load(holder, storage_reader=FileSystemReader(self.path), no_dist=True)
        except CheckpointException as e:  # a BaseException carrying each rank's (exception, traceback)
            failure = next(iter(e.failures.values()), None)
            cause = failure[0] if isinstance(failure, tuple) else failure
            raise RuntimeError(f"reading '{fqn}': {type(cause).__name__}: {str(cause).splitlines()[0][:200]}") from None
        return holder[fqn]

    def tensor(self, name: str) -> torch.Tensor:
        """One model tensor (KeyError when the checkpoint has none of that name)."""
        if not self.sharded:
            return self._model[name]
        fqn = self._fqn[name]
        meta = self._meta[fqn]
        return self._dcp_load(fqn, torch.empty(meta.size, dtype=meta.properties.dtype))

    def shape(self, name: str) -> tuple[int, ...]:
        """One model tensor's shape, read from the metadata or the memory-mapped header (KeyError as `tensor`)."""
        return tuple(self._meta[self._fqn[name]].size if self.sharded else self._model[name].shape)

    def value(self, *path: str):
        """A small non-tensor entry of `state`, e.g. value('callbacks', 'RunGuard', 'run_config'); None if absent."""
        if not self.sharded:
            node = self._state
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            return node
        fqn = self._objects.get(("state", *path))
        return None if fqn is None else self._dcp_load(fqn, None)


# -- torch FSDP1 (through Composer) on CPU with gloo ------------------------------------------------------------
_FSDP_CPU = []


def _fsdp_private():
    import torch.distributed.fsdp._flat_param as flat_param  # a private API, imported where it is used and checked
    import torch.distributed.fsdp._init_utils as init_utils  # a private API, imported where it is used and checked
    import torch.distributed.fsdp._optim_utils as optim_utils  # a private API, imported where it is used and checked

    shim = "enable_fsdp_on_cpu"
    require(callable(getattr(init_utils, "_check_module_states_for_sync_module_states", None)), shim,
            "torch.distributed.fsdp._init_utils._check_module_states_for_sync_module_states", "torch")
    require(callable(getattr(flat_param.FlatParamHandle, "to_cpu", None)), shim,
            "torch.distributed.fsdp._flat_param.FlatParamHandle.to_cpu", "torch")
    gather = getattr(optim_utils, "_allgather_orig_param_states", None)
    require(callable(gather) and "cpu_offload" in inspect.signature(gather).parameters, shim,
            "torch.distributed.fsdp._optim_utils._allgather_orig_param_states(..., cpu_offload)", "torch")
    return init_utils, flat_param, optim_utils


def enable_fsdp_on_cpu() -> None:
    """Let Composer's own FSDP1 path run on CPU processes (gloo), for tests and laptops. Idempotent; a no-op
    where CUDA is available (GPU runs take the untouched path). Four private spots, each checked:

    1. Composer passes `device_id=torch.cuda.current_device()` to FSDP, which fails without a driver:
       `torch.cuda.current_device` returns the CPU device instead.
    2. FSDP1 refuses `sync_module_states=True` for CPU tensors (it assumes NCCL); gloo broadcasts them fine:
       `_init_utils._check_module_states_for_sync_module_states` is skipped.
    3. A full state dict with `offload_to_cpu` "moves" the unsharded flat parameter to the CPU (a no-op there)
       and then frees its storage, which the views still use: rank 0 died with SIGSEGV saving a full
       checkpoint. `FlatParamHandle.to_cpu` does nothing when the parameter is already on the CPU.
    4. The full optimizer state with `cpu_offload` `.cpu()`s each gathered state (a no-op on CPU) instead of
       cloning it, so every state was a view of one reused buffer (exp_avg == exp_avg_sq in saved checkpoints):
       `_optim_utils._allgather_orig_param_states` takes the cloning branch on CPU.
    """
    if _FSDP_CPU or torch.cuda.is_available():
        return
    init_utils, flat_param, optim_utils = _fsdp_private()
    gather = optim_utils._allgather_orig_param_states
    torch.cuda.current_device = lambda: torch.device("cpu")
    init_utils._check_module_states_for_sync_module_states = lambda module_states: None
    to_cpu = flat_param.FlatParamHandle.to_cpu

    def to_cpu_unless_there(self):
        return contextlib.nullcontext() if self.flat_param.device.type == "cpu" else to_cpu(self)

    flat_param.FlatParamHandle.to_cpu = to_cpu_unless_there

    def gather_states(fsdp_param_info, gathered_state_info, input_states, shard_state, to_save, cpu_offload):
        on_cpu = fsdp_param_info.state.compute_device.type == "cpu"
        return gather(fsdp_param_info, gathered_state_info, input_states, shard_state, to_save,
                      cpu_offload and not on_cpu)

    optim_utils._allgather_orig_param_states = gather_states
    _FSDP_CPU.append(True)


# -- Composer / torch: memory that outlives a closed trainer ----------------------------------------------
def _engine_close():
    from composer.core.engine import Engine  # heavy: composer

    require(callable(getattr(Engine, "_close", None)), "close_trainer", "composer.core.engine.Engine._close",
            "mosaicml")
    return Engine._close


def _fqn_cache():
    from torch.distributed.checkpoint import state_dict as dcp_state_dict  # heavy: torch

    cached = getattr(dcp_state_dict, "_get_fqns", None)
    require(callable(getattr(cached, "cache_clear", None)), "close_trainer",
            "torch.distributed.checkpoint.state_dict._get_fqns (an lru_cache)", "torch")
    return cached


def close_trainer(trainer) -> None:
    """Close a trainer and drop the references that outlive it. Two of them kept every trainer's state (model,
    optimizer, dataloaders: 2-3 GB per SmolLM2 stage, 16.5 GB peak over reproduce-mini's six arms) until the
    process exited: Composer 0.32's Engine registers `atexit(Engine._close, state, logger)`, and torch 2.7's
    `torch.distributed.checkpoint.state_dict._get_fqns` is an lru_cache keyed by the model. After close() the
    hook has nothing left to do, so it is unregistered (this also drops the hook of any other open trainer:
    close those yourself), and the cache is cleared (it only saves recomputing parameter names).
    """
    trainer.close()
    atexit.unregister(_engine_close())
    _fqn_cache().cache_clear()


# -- multiprocessing: DataLoader workers that leave stop signals to the main process ---------------------------
def ignore_stop_signals(worker_id: int, sigterm: bool = True) -> None:
    """DataLoader `worker_init_fn`: Ctrl-C (SIGINT) and a scheduler's SIGTERM reach the whole process group,
    and a worker stopped by one would print its own traceback or crash the main process before it can save.
    Workers ignore SIGINT always and SIGTERM when `sigterm` (runs that checkpoint on SIGTERM); those no longer
    stop on the SIGTERM that multiprocessing sends them when the main process exits, so
    `kill_workers_at_exit` SIGKILLs them then."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


_EXIT_HOOK = []


def kill_workers_at_exit() -> None:
    """Register (once) an exit hook that SIGKILLs this process's remaining multiprocessing children (the
    DataLoader workers): atexit hooks run last-registered first, so it runs before multiprocessing's own
    exit hook, which would otherwise join the SIGTERM-ignoring workers forever."""

    def kill() -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kills as worker failures
        for child in multiprocessing.active_children():
            child.kill()

    if not _EXIT_HOOK:
        _EXIT_HOOK.append(atexit.register(kill))


# -- transformers: forcing an attention implementation on a config ---------------------------------------------
def set_attn_implementation(config, name: str) -> None:
    """Make `AutoModelForCausalLM.from_config(config)` use attention `name` ('sdpa', 'eager'); transformers
    4.53 reads the private `config._attn_implementation` (from_config's own argument is not honoured
    by every path used here)."""
    require(hasattr(config, "_attn_implementation"), "set_attn_implementation",
            "PretrainedConfig._attn_implementation", "transformers")
    config._attn_implementation = name


def check_all() -> None:
    """Every shim's check against the installed packages (raises CompatError on the first that fails)."""
    from transformers import LlamaConfig  # heavy: transformers

    _composer_checkpoint_module()
    _composer_dist_module()
    _dcp_load_everything()
    _fsdp_private()
    _engine_close()
    _fqn_cache()
    set_attn_implementation(LlamaConfig(), "sdpa")
