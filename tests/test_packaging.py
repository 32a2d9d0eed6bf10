"""The package layout contract: private-API shims hold against the pinned versions, recipes ship inside the
wheel and resolve by name outside the repository, and named callbacks, schedulers and loggers are checked."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO, paths

from llmshearing import compat, registry
from llmshearing.errors import ConfigError
from llmshearing.train.config import load_config, resolve_recipe, shipped_recipes


def test_every_private_api_shim_holds_for_the_installed_versions():
    compat.check_all()


def test_a_shim_whose_private_api_is_gone_fails_loudly(monkeypatch):
    from composer.utils import checkpoint

    monkeypatch.delattr(checkpoint, "_write_checkpoint_file")
    with pytest.raises(compat.CompatError, match="install_atomic_writes.*_write_checkpoint_file.*mosaicml 0.32"):
        compat.install_atomic_writes()


def test_recipes_resolve_by_name_and_typos_get_a_suggestion():
    assert {"prune_1.3b", "continue_2.7b", "demo_smollm2", "testing/prune_tiny"} <= set(shipped_recipes())
    with open(resolve_recipe("testing/prune_tiny")) as a, open(os.path.join(REPO, "yamls/testing/prune_tiny.yaml")) as b:
        assert a.read() == b.read()
    with pytest.raises(ConfigError, match="did you mean the shipped recipe 'prune_1.3b'"):
        resolve_recipe("prune_1.3")


@pytest.mark.slow
def test_wheel_ships_the_recipes_and_resolves_them_outside_the_repository(tmp_path):
    shutil.rmtree(os.path.join(REPO, "build"), ignore_errors=True)  # setuptools' in-tree build folder: no stale files
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), REPO], capture_output=True, text=True, timeout=600)
    shutil.rmtree(os.path.join(REPO, "build"), ignore_errors=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("llmshearing-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for recipe in ("prune_1.3b", "prune_2.7b", "continue_1.3b", "demo_smollm2", "demo_continue",
                   "testing/prune_tiny", "reference/sheared-llama-1.3b"):
        assert f"llmshearing/recipes/{recipe}.yaml" in names, recipe
    assert "llmshearing/eval/tasks/llmshearing_mc.jsonl" in names
    # callbacks/ and data_prep/ install inside the package: the wheel adds no generic top-level import name
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"llmshearing"}, sorted(names)[:20]
    assert {"llmshearing/callbacks/run_guard.py", "llmshearing/data_prep/shards.py"} <= set(names)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)  # a wheel is a zip of the installed tree: this is a non-editable install
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = ("import llmshearing, os; from llmshearing.train.config import resolve_recipe; "
            "import llmshearing.callbacks.run_guard as g, llmshearing.data_prep.shards as s; "
            "p = resolve_recipe('demo_smollm2'); print(llmshearing.__file__); print(p); assert os.path.isfile(p); "
            "print(g.__file__); print(s.__file__)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(p.startswith(str(site)) for p in proc.stdout.split()), proc.stdout  # package, recipe, callbacks, data_prep


def test_registry_names_are_checked_before_any_work(tiny_setup, tmp_path):
    base = [*paths(tiny_setup, str(tmp_path / "run"))]
    tiny = os.path.join(REPO, "yamls", "testing", "prune_tiny.yaml")
    cfg = load_config(tiny, base + ["callbacks={memory_monitor: {}, lr_monitor: {}}"])
    assert set(cfg.callbacks) == {"memory_monitor", "lr_monitor"}
    with pytest.raises(ConfigError, match="unknown callback 'lr_monitr'; did you mean 'lr_monitor'"):
        load_config(tiny, base + ["callbacks={lr_monitr: {}}"])
    with pytest.raises(ConfigError, match=r"callbacks.speed_monitor: .*unexpected keyword argument 'window'"):
        load_config(tiny, base + ["callbacks={speed_monitor: {window: 3}}"])
    with pytest.raises(ConfigError, match="'dynamic_loading' is built from 'data.dynamic'"):
        load_config(tiny, base + ["callbacks={dynamic_loading: {}}"])
    with pytest.raises(ConfigError, match="unknown scheduler 'cosine'"):
        load_config(tiny, base + ["scheduler.name=cosine"])
    assert {"dynamic_loading", "pruning_log", "run_guard", "stop_on_signal", "speed_monitor"} <= set(registry.callbacks.names())
    with pytest.raises(ConfigError, match="'stop_on_signal' is built from 'save_on_sigterm'"):
        registry.callbacks.get("stop_on_signal", "callbacks")


def test_named_callbacks_and_schedulers_are_built(tiny_setup, tmp_path):
    from composer.callbacks import LRMonitor, MemoryMonitor
    from composer.optim import LinearWithWarmupScheduler

    from llmshearing.callbacks import DynamicLoading, PruningLog, RanksAgree, RunGuard, StopOnNonFinite, StopOnSignal
    from llmshearing.train.builders import build_callbacks, build_scheduler

    cfg = load_config(os.path.join(REPO, "yamls", "testing", "prune_tiny.yaml"),
                      paths(tiny_setup, str(tmp_path / "run")) + ["callbacks={memory_monitor: {}, lr_monitor: {}}",
                                                                   "scheduler.name=linear_with_warmup"])
    kinds = [type(c) for c in build_callbacks(cfg, str(tmp_path))]
    assert kinds == [RunGuard, StopOnNonFinite, StopOnSignal, RanksAgree, PruningLog, DynamicLoading, MemoryMonitor,
                     LRMonitor]
    quiet = load_config(os.path.join(REPO, "yamls", "testing", "prune_tiny.yaml"),
                        paths(tiny_setup, str(tmp_path / "run2")) + ["save_on_sigterm=false", "stop_on_nonfinite=false"])
    assert [type(c) for c in build_callbacks(quiet, str(tmp_path))][:2] == [RunGuard, RanksAgree]
    assert isinstance(build_scheduler(cfg), LinearWithWarmupScheduler)
