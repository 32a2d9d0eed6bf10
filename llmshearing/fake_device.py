"""The second-device tier: run the GPU code paths at their real shapes on torch's meta device, with no GPU and no weights.

A meta tensor has a device, a shape and a dtype but no data. A tensor created without `device=` (so on the CPU) that
meets a meta tensor fails where it would meet a CUDA tensor on a GPU ("Tensor on device meta is not on the expected
device cpu!"), and a 7B model at 2 x 4096 tokens costs no memory and seconds of time. Reading a value (`.item()`,
`float()`, `bool()`, `.tolist()`) has nothing to read: inside `meta_values()` such reads return placeholders (0.5 for a
float, 1 for an int, True for a bool, 0..n-1 along the last dim for `.tolist()`, a valid keep set), so data-dependent
control flow takes one branch; `nonzero` assumes every element nonzero (torch's own option for meta).
Device checks that meta kernels skip but CUDA makes (`index_select` with a CPU index, ...) are made here
(`check_devices`): an op that meets a meta tensor and a CPU tensor of one or more dimensions fails, except the
ops CUDA accepts so (copies, indexing with CPU indices).

What the tier cannot see: kernels (flash-attn, bf16 numerics, CUDA-only ops), NCCL, values, and device checks that
torch's meta functions skip and `check_devices` does not know of. Those need a GPU (bench/gpu_check.py; docs/devices.md).
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

META = torch.device("meta")


class _Placeholders(TorchDispatchMode):
    """Answers scalar reads of meta tensors (aten._local_scalar_dense, what `.item()`, `float()` and `bool()` call)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            dtype = args[0].dtype
            return True if dtype == torch.bool else 0.5 if dtype.is_floating_point or dtype.is_complex else 1
        check_devices(func, args, kwargs)
        return func(*args, **(kwargs or {}))


def _placeholder_list(shape: tuple[int, ...], dtype: torch.dtype):
    if not shape:
        return True if dtype == torch.bool else 0.5 if dtype.is_floating_point else 1
    if len(shape) == 1:
        return list(range(shape[0])) if not dtype.is_floating_point else [0.5] * shape[0]
    return [_placeholder_list(shape[1:], dtype) for _ in range(shape[0])]


# Ops that CUDA runs with CPU tensors among CUDA ones: copies between devices and indexing by CPU index tensors
_CROSS_DEVICE_OK = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default, torch.ops.aten.index.Tensor}
# index_put(self, indices, values): CPU indices are accepted, CPU values (of one or more dimensions) are not
_INDEX_PUT = {torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
              torch.ops.aten._index_put_impl_.default}


def check_devices(func, args, kwargs) -> None:
    """CUDA's rule where meta kernels skip it (index_select, gather, scatter, cat... with a CPU operand): an op that
    meets a meta tensor and a CPU tensor of one or more dimensions (a 0-dim CPU tensor is a scalar CUDA accepts)
    fails as it would on a GPU."""
    if func in _CROSS_DEVICE_OK:
        return
    if func in _INDEX_PUT:
        args, kwargs = (args[0], args[2]), None
    tensors = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
    if any(t.is_meta for t in tensors):
        cpu = [tuple(t.shape) for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        if cpu:
            raise RuntimeError(f"{func}: a CPU tensor of shape {cpu[0]} meets meta tensors (on a GPU: a CPU tensor "
                               f"among CUDA ones); create it on the device of the tensors it meets")


@contextlib.contextmanager
def meta_values():
    """Value reads of meta tensors return placeholders. The default device stays the CPU on purpose: a tensor the code
    creates without `device=` must land on the CPU and clash with the meta tensors, as it would with CUDA ones."""
    tolist = torch.Tensor.tolist

    def meta_tolist(self):
        return _placeholder_list(tuple(self.shape), self.dtype) if self.is_meta else tolist(self)

    torch.Tensor.tolist = meta_tolist
    try:
        with _Placeholders(), _nonzero_all():
            yield
    finally:
        torch.Tensor.tolist = tolist


@contextlib.contextmanager
def _nonzero_all():
    """`nonzero` of a meta tensor has no data to count: torch's option answers as if every element were nonzero."""
    import torch.fx.experimental._config as fx_config  # a private API, imported where it is used and checked

    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


def to_meta(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every parameter and buffer on the meta device (ties kept: `Module.to` moves shared tensors once)."""
    return module.to(META)


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors alive at once, per device type, and their peak: a dispatch mode that registers the
    storage of every tensor an op returns (and those given to `track`). Works on meta tensors, which have no data
    pointer: a storage is keyed by its StorageImpl (`untyped_storage()._cdata`) and is alive while anything besides
    this tracker holds it (`torch._C._storage_Use_Count > 1`); dead entries are dropped as they are found, so a check
    costs the number of live storages. Sizes are read at every check, so FSDP's `_free_storage` (a resize to 0)
    counts as a free. `phase` (set by the caller) is recorded with each new peak; `label` names storages, and each
    new peak's bytes are split by name (`peak_parts`, the unnamed under 'other')."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[torch.UntypedStorage, str]] = {}
        self.labels: dict[int, str] = {}
        self.peak: dict[str, int] = {}
        self.peak_phase: dict[str, str | None] = {}
        self.peak_parts: dict[str, dict[str, int]] = {}
        self.phase: str | None = None

    def _add(self, t: torch.Tensor) -> bool:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.storages:
            return False
        self.storages[key] = (storage, storage.device.type)
        return True

    def track(self, tensors, label: str | None = None) -> None:
        """Count tensors created outside the mode (parameters, optimizer states); `label` names their part."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)
                if label is not None:
                    self.labels[t.untyped_storage()._cdata] = label

    def label(self, tensors, name: str) -> None:
        self.track(tensors, name)

    def live(self) -> dict[str, int]:
        """Bytes alive now per device type ('meta', 'cpu', 'cuda'); checks the peak."""
        total: dict[str, int] = {}
        dead = []
        count = torch._C._storage_Use_Count
        for key, (storage, device) in self.storages.items():
            if count(key) > 1:
                total[device] = total.get(device, 0) + storage.nbytes()
            else:
                dead.append(key)
        for key in dead:
            del self.storages[key]
            self.labels.pop(key, None)
        for device, n in total.items():
            if n > self.peak.get(device, -1):
                self.peak[device], self.peak_phase[device] = n, self.phase
                self.peak_parts[device] = self._parts(device)
        return total

    def _parts(self, device: str) -> dict[str, int]:
        parts: dict[str, int] = {}
        for key, (storage, where) in self.storages.items():
            if where == device:
                name = self.labels.get(key, "other")
                parts[name] = parts.get(name, 0) + storage.nbytes()
        return parts

    def reset_peak(self) -> None:
        self.peak, self.peak_phase, self.peak_parts = {}, {}, {}
        self.live()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        new = False
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                new = self._add(t) or new
        # a view or an in-place op allocates nothing, except that FSDP resizes a flat parameter's storage before
        # the collective that fills it
        if new or func.namespace == "c10d":
            self.live()
        return out
