"""Callbacks, schedulers and loggers by name, so that a recipe can name them (`callbacks: {lr_monitor: {}}`).

The project's own callbacks (top-level `callbacks/`) and Composer's common ones are registered here on the first
lookup. `register(...)` adds your own (e.g. in a plugin module).
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

from llmshearing.errors import ConfigError


class Registry:
    """name -> factory (a class or a function returning the object), with config-time argument checks."""

    def __init__(self, kind: str):
        self.kind, self._items = kind, {}
        self._configured_by: dict[str, str] = {}

    def register(self, name: str, factory: Callable | None = None, *, configured_by: str | None = None):
        """Register `factory` under `name` (usable as a decorator). `configured_by`: the recipe section that
        builds this one (such entries cannot be listed again by name)."""
        def add(f):
            self._items[name] = f
            if configured_by:
                self._configured_by[name] = configured_by
            return f
        return add(factory) if factory is not None else add

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._items)

    def get(self, name: str, where: str) -> Callable:
        _load_builtins()
        if name in self._configured_by:
            raise ConfigError(f"{where}: the {self.kind} '{name}' is built from '{self._configured_by[name]}'; "
                              f"configure it there")
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(self._items))}"
            raise ConfigError(f"{where}: unknown {self.kind} '{name}'; {hint}")
        return self._items[name]

    def check(self, name: str, kwargs: Any, where: str) -> None:
        """The name is registered and `kwargs` bind to its signature (checked before any work starts)."""
        factory = self.get(name, where)
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ConfigError(f"{where}.{name}: expected a mapping of arguments, got {kwargs!r}")
        try:
            inspect.signature(factory).bind(**(kwargs or {}))
        except TypeError as e:
            raise ConfigError(f"{where}.{name}: {e}") from None

    def build(self, name: str, kwargs: dict | None, where: str):
        self.check(name, kwargs, where)
        return self.get(name, where)(**(kwargs or {}))


callbacks = Registry("callback")
schedulers = Registry("scheduler")
loggers = Registry("logger")
_loaded = []


def _load_builtins() -> None:
    """Register Composer's callbacks, schedulers and loggers and the project's `callbacks` package."""
    if _loaded:
        return
    _loaded.append(True)
    from composer import callbacks as cc  # heavy: composer
    from composer import loggers as cl  # heavy: composer
    from composer import optim as co  # heavy: composer

    for name, cls in {"speed_monitor": cc.SpeedMonitor, "lr_monitor": cc.LRMonitor,
                      "memory_monitor": cc.MemoryMonitor, "optimizer_monitor": cc.OptimizerMonitor,
                      "runtime_estimator": cc.RuntimeEstimator}.items():
        callbacks.register(name, cls)
    schedulers.register("cosine_with_warmup", co.CosineAnnealingWithWarmupScheduler)
    schedulers.register("linear_with_warmup", co.LinearWithWarmupScheduler)
    schedulers.register("constant", co.ConstantScheduler)
    loggers.register("wandb", cl.WandBLogger)
    loggers.register("file", cl.FileLogger)
    # the project's own, each built from its recipe section (composer + torch: imported on the first lookup)
    from llmshearing.callbacks import (ClipGradNorm, DynamicLoading, PruningLog, RanksAgree, ReplicatedGrads, RunGuard,
                                       StopOnNonFinite, StopOnSignal)

    callbacks.register("dynamic_loading", DynamicLoading, configured_by="data.dynamic")
    callbacks.register("pruning_log", PruningLog, configured_by="pruning")
    callbacks.register("run_guard", RunGuard, configured_by="save_folder")
    callbacks.register("stop_on_nonfinite", StopOnNonFinite, configured_by="stop_on_nonfinite")
    callbacks.register("stop_on_signal", StopOnSignal, configured_by="save_on_sigterm")
    callbacks.register("ranks_agree", RanksAgree, configured_by="save_folder")
    callbacks.register("replicated_grads", ReplicatedGrads, configured_by="fsdp")
    callbacks.register("clip_grad_norm", ClipGradNorm, configured_by="optimizer.clip_grad_norm")
