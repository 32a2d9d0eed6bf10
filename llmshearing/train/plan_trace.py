"""`llmshearing plan --trace`: one training step of a recipe at its real shapes on the meta device, measured.

The formula plan (`plan.py`) adds up terms; this runs the step and counts what is alive. The model (and the teacher,
and the L0 masks) are built on torch's meta device (shapes and dtypes, no data), wrapped by Composer's own
`prepare_fsdp_module` (FSDP1 as a training run wraps it: the recipe's sharding strategy and mixed precision, every
DecoderLayer its own unit, activation checkpointing per layer) over torch's fake process group of world size N
(`FakeStore` + backend "fake": rank 0 of N, collectives do nothing), and step 2 of training runs: every microbatch's
forward, loss (+ the teacher and the KD loss) and backward, then AdamW's step, with AdamW's two states per sharded
parameter already there (created by a first step). `fake_device.LiveBytes` records the peak bytes alive on the
device, which is rank 0's per-GPU peak (ranks differ only by a few elements of padding).

FSDP1 does not know the meta device; six private spots are bridged for the duration of the trace (`_meta_fsdp`):
  1. `torch.meta`: FSDP looks up a device module by the device's type (torch.cuda on GPUs); a stand-in answering
     `current_device()` with 'meta' and everything else (streams, events) with torch.cpu's no-op versions.
  2. `torch.cuda.current_device` returns the meta device: Composer passes it to FSDP as `device_id`.
  3. FSDP's `_need_to_materialize_module` says no: the modules are on the compute device already (FSDP would
     otherwise call Composer's param_init_fn, which allocates on 'cuda:N').
  4. The c10d collectives have no meta kernels: `_FakeCollectives` hands them empty CPU stand-ins, which the fake
     process group ignores as it would the real tensors, and returns the meta tensors (an all-gather's output
     keeps its size, its values are not needed).
  5. SDPA on meta picks its math backend (which would hold the T x T attention matrix); the trace calls the flash
     kernel's op directly (`aten._scaled_dot_product_flash_attention`, which has meta kernels), i.e. what flash-attn
     or SDPA's flash backend keeps on a GPU. With grouped-query attention its K/V are expanded to the query heads
     first (an overcount of 2 (H - K) h bytes per token per layer; the paper recipes have K = H).
  6. FSDP's `_data_ptr_allocated` (is an unsharded flat parameter allocated?) reads a data pointer, which meta
     storages do not have (0); on meta it reads the storage's size instead (SHARD_GRAD_OP asserts on it).
`fake_device.meta_values` answers value reads and `nonzero` (the KD loss's label mask: every position labelled, as in
packed sequences) and checks that no CPU tensor meets the meta ones, as CUDA would.

What the trace cannot see: CUDA's context, NCCL's buffers, cuBLAS workspaces and the caching allocator's
fragmentation (the plan's reserve), the gradient clipping and the masks' all-reduce callbacks (a few temporaries of
the sharded size), and autocast (it does not act on meta tensors: with FSDP's mixed precision the parameters are
gathered in the compute dtype, so the layers compute in it anyway; without fsdp, an amp recipe cannot be traced).
"""
from __future__ import annotations

import contextlib
import time
import warnings

import torch
import torch.nn.functional as F

from llmshearing.errors import ConfigError
from llmshearing.fake_device import META, LiveBytes, meta_values

GiB = 2**30
TRACEABLE = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")  # HYBRID strategies need a two-level device mesh


class _MetaDeviceHandle:
    """FSDP's device module for 'meta' (see the module docstring, 1)."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device():
        return "meta"

    @staticmethod
    def set_device(device):
        return None


class _FakeCollectives(torch.utils._python_dispatch.TorchDispatchMode):
    """c10d ops on meta tensors go to the fake process group with empty CPU stand-ins (module docstring, 4)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "c10d":
            return func(*args, **kwargs)
        swapped = {}

        def stand_in(t):
            if isinstance(t, torch.Tensor) and t.is_meta:
                cpu = torch.empty(0, dtype=t.dtype)
                swapped[id(cpu)] = t
                return cpu
            return t

        args, kwargs = torch.utils._pytree.tree_map(stand_in, (args, kwargs))
        out = func(*args, **kwargs)
        return torch.utils._pytree.tree_map(lambda t: swapped.get(id(t), t) if isinstance(t, torch.Tensor) else t, out)


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA through the flash kernel's op (module docstring, 5); a mask (sliding windows) takes SDPA's own path."""
    if attn_mask is not None or not q.is_meta:
        return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]


_SDPA = F.scaled_dot_product_attention


@contextlib.contextmanager
def _meta_fsdp(world_size: int):
    """FSDP1 over a fake process group of `world_size` ranks, on the meta device, for the duration."""
    import torch.distributed as dist  # heavy: torch
    from torch.distributed.fsdp import _flat_param, _init_utils  # heavy: torch
    # a private API, imported where it is used and checked
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise ConfigError("--trace starts its own (fake) process group; run it outside a distributed launch")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    saved = (torch.cuda.current_device, _init_utils._need_to_materialize_module, _flat_param._data_ptr_allocated)
    allocated = _flat_param._data_ptr_allocated
    _flat_param._data_ptr_allocated = lambda t: t.untyped_storage().nbytes() > 0 if t.is_meta else allocated(t)
    torch.meta = _MetaDeviceHandle()
    torch.cuda.current_device = lambda: META
    _init_utils._need_to_materialize_module = lambda *args, **kwargs: (False, False)
    try:
        with _flash_attention(), _FakeCollectives(), warnings.catch_warnings():
            # FSDP's note that the meta device has no index, Composer's that reentrant checkpointing is its default
            warnings.filterwarnings("ignore", message=".*(explicit index|CheckpointImpl).*")
            yield
    finally:
        torch.cuda.current_device, _init_utils._need_to_materialize_module, _flat_param._data_ptr_allocated = saved
        del torch.meta
        dist.destroy_process_group()


@contextlib.contextmanager
def _flash_attention():
    """SDPA through the flash kernel's op on meta tensors (module docstring, 5)."""
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


def _fsdp_config(fsdp: dict, precision: str):
    """Composer's FSDPConfig for the recipe's fsdp section, with the mixed precision spelled as dtypes (Composer
    derives them from the Trainer's precision, which it refuses on a CPU device for amp) and sync_module_states off
    (there are no weights to broadcast)."""
    from composer.distributed.mosaic_parallelism import get_mixed_precision  # heavy: composer
    from composer.utils.parallelism import FSDPConfig  # heavy: composer

    settings = dict(fsdp)
    mp = get_mixed_precision(precision, settings.get("mixed_precision", "DEFAULT"),
                             settings.get("keep_low_precision_grads", False))[0]
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", None: None}
    settings["mixed_precision"] = {"param_dtype": names[mp.param_dtype], "reduce_dtype": names[mp.reduce_dtype],
                                   "buffer_dtype": names[mp.buffer_dtype]}
    settings["sync_module_states"] = False
    settings.pop("state_dict_type", None)  # checkpoints only
    try:
        return FSDPConfig(**settings)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"fsdp: {e}") from None


def _build(config, target, teacher_config, distill: dict | None):
    """The ComposerLM on the meta device: the model, its L0 masks when pruning, the frozen teacher with `distill`."""
    from llmshearing.train.composer_model import ComposerLM  # heavy: composer, transformers
    from llmshearing.model.decoder import DecoderLM  # heavy: transformers
    from llmshearing.model.distill import Teacher  # heavy: transformers
    from llmshearing.pruning.masks import L0Module  # heavy: transformers
    from llmshearing.pruning.shapes import shape_of  # heavy: transformers

    with torch.device(META):
        lm = DecoderLM(config, "sdpa")
        l0 = None if target is None else L0Module(shape_of(config), target)
        model = ComposerLM(lm, l0)
        if distill is not None:
            d = distill
            model.teacher = Teacher(DecoderLM(teacher_config, "sdpa"), d.get("alpha", 1.0),
                                    d.get("temperature", 1.0), d.get("top_k"))
    return model


def _fsdp_parts(model) -> dict[str, list]:
    """The storages FSDP keeps per unit, by part: the fp32 shards (student, teacher), the low-precision shard
    and the gathered (padded) parameter."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # heavy: torch

    parts = {"params_shard": [], "teacher_shard": [], "gathered": []}  # gathered: after the first forward
    for name, module in model.named_modules():
        if not isinstance(module, FSDP) or module._handle is None:
            continue
        flat = module._handle.flat_param
        parts["teacher_shard" if name.startswith("teacher") else "params_shard"].append(flat)
        for attr in ("_full_param_padded", "_mp_shard", "_full_prec_full_param_padded"):
            t = getattr(flat, attr, None)
            if isinstance(t, torch.Tensor):
                parts["gathered"].append(t)
    return parts


def _unique_grads(params):
    seen = {}
    for p in params:
        if p.grad is not None:
            seen.setdefault(p.grad.untyped_storage()._cdata, p.grad)
    return list(seen.values())


def trace_step(*, config, target, teacher_config, distill: dict | None, fsdp: dict | None, precision: str,
               gpus: int, microbatch: int, per_device: int, T: int) -> dict:
    """Peak bytes alive on rank 0's device over step 2 of training (GiB), with what was alive at the peak by part."""
    from composer.distributed.dist_strategy import prepare_fsdp_module  # heavy: composer

    if fsdp is None:
        if precision != "fp32":
            raise ConfigError(f"--trace: a recipe without an fsdp section and precision {precision} runs under "
                              f"autocast, which does not act on meta tensors; it can trace fsdp recipes and fp32 ones")
    else:
        strategy = str(fsdp.get("sharding_strategy", "FULL_SHARD")).upper()
        if strategy not in TRACEABLE:
            raise ConfigError(f"--trace: fsdp.sharding_strategy {strategy} needs a two-level device mesh, which the "
                              f"fake process group does not give; it can trace {', '.join(TRACEABLE)}")
        if fsdp.get("activation_cpu_offload"):
            raise ConfigError("--trace: fsdp.activation_cpu_offload moves activations to the host, which the trace "
                              "does not follow; set it to false to trace")
    started = time.monotonic()
    tracker = LiveBytes()
    with _meta_fsdp(gpus), meta_values():
        model = _build(config, target, teacher_config, distill)
        groups = model.param_groups(1e-4, 0.0, 1.0, 1.0)
        optimizer = torch.optim.AdamW(groups, lr=1e-4, foreach=True)  # as on a GPU (torch's default there)
        if fsdp is not None:
            prepare_fsdp_module(model, optimizer, _fsdp_config(fsdp, precision), precision="fp32", device="cpu")
        model.train()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        with tracker:
            # AdamW's states exist from step 1 on: a step with zero gradients creates them as a first step does
            for p in params:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        tracker.track([*model.parameters(), *model.buffers()])
        tracker.label([s for state in optimizer.state.values() for s in state.values()
                       if isinstance(s, torch.Tensor)], "optimizer")
        masks = [] if model.l0 is None else list(model.l0.parameters())
        tracker.label(masks, "masks")
        for part, tensors in _fsdp_parts(model).items():
            tracker.label(tensors, part)
        if fsdp is None:
            tracker.label([p for p in model.model.parameters()], "params_shard")
            if getattr(model, "teacher", None) is not None:
                tracker.label(list(model.teacher.parameters()), "teacher_shard")
        with tracker:
            tracker.reset_peak()
            before = dict(tracker.live())
            outputs = loss = None
            for i in range(per_device // microbatch):
                batch = {"input_ids": torch.zeros(microbatch, T, dtype=torch.long, device=META),
                         "labels": torch.zeros(microbatch, T, dtype=torch.long, device=META),
                         "batch_index": torch.ones(microbatch, dtype=torch.long)}
                tracker.phase = f"forward (microbatch {i + 1})"
                outputs = model(batch)  # Composer keeps state.outputs and state.loss until the next microbatch's
                if i == 0:  # FSDP allocates its gathered buffers at the first forward
                    tracker.label(_fsdp_parts(model)["gathered"], "gathered")
                tracker.phase = f"loss (microbatch {i + 1})"
                loss = model.loss(outputs, batch)
                total = loss["total"] if isinstance(loss, dict) else loss
                tracker.phase = f"backward (microbatch {i + 1})"
                total.backward()
            grads = sum(g.untyped_storage().nbytes() for g in _unique_grads(params))
            tracker.phase = "optimizer step"
            optimizer.step()
            tracker.live()
            del outputs, loss, total
    device = "meta"
    peak = tracker.peak.get(device, 0)
    parts = {k: v / GiB for k, v in sorted(tracker.peak_parts.get(device, {}).items())}
    return {"traced_gib": peak / GiB, "peak_phase": tracker.peak_phase.get(device),
            "at_peak_gib": parts, "before_step_gib": before.get(device, 0) / GiB,
            "grads_after_backward_gib": grads / GiB, "host_bytes_during_step": tracker.peak.get("cpu", 0),
            "microbatches": per_device // microbatch, "seconds": round(time.monotonic() - started, 1)}


def trace_activation_init(config, sequences: int, T: int) -> dict:
    """Peak bytes on rank 0's device while `pruning.init: activation` scores the units (`mask_init.init_masks`: the
    fp32 model moved to the GPU before FSDP wraps it, `oneshot.activation_scores` on `sequences` calibration
    sequences of T tokens, no gradients, no autocast), traced on the meta device as `trace_step` is, beside
    `oneshot.activation_peak_bytes`, the formula. The scoring takes `sequences_per_pass` sequences at a time and
    keeps only per-unit sums between passes, so one pass has the peak: that is what is traced."""
    from llmshearing.model.decoder import DecoderLM  # heavy: transformers
    # heavy: transformers
    from llmshearing.pruning.oneshot import activation_peak_bytes, activation_scores, sequences_per_pass

    started = time.monotonic()
    with torch.device(META):
        lm = DecoderLM(config, "sdpa")
    tracker = LiveBytes()
    tracker.label([*lm.parameters()], "model")
    with _flash_attention(), meta_values(), tracker:
        tracker.reset_peak()
        traced = min(sequences, sequences_per_pass(T))
        activation_scores(lm, torch.zeros(traced, T, dtype=torch.long, device=META))
    parts = {k: v / GiB for k, v in sorted(tracker.peak_parts.get("meta", {}).items())}
    return {"estimate_gib": activation_peak_bytes(config, T) / GiB, "traced_gib": tracker.peak.get("meta", 0) / GiB,
            "at_peak_gib": parts, "sequences": sequences, "traced_sequences": traced,
            "seq_len": T, "seconds": round(time.monotonic() - started, 1)}
