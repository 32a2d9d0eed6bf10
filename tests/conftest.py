import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llmshearing.experiments.tiny import FAMILY_CONFIGS, make_tiny  # noqa: E402

FAMILIES = list(FAMILY_CONFIGS)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """The `make tiny` folder: model/ (GQA, tied embeddings), text/{prose,code}.jsonl and their shards/."""
    return make_tiny(str(tmp_path_factory.mktemp("tiny")), "smollm2-gqa")


BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": REPO}
TINY_YAML = os.path.join("yamls", "testing", "prune_tiny.yaml")
CONTINUE_YAML = os.path.join("yamls", "testing", "continue_tiny.yaml")


def shards_before_the_test_split(shards, out) -> str:
    """A copy of a shard folder whose manifest lists no test split (as shards built before it existed)."""
    import shutil

    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["domains"].values():
        del entry["splits"]["test"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return str(out)


def paths(setup, folder):
    """Overrides that point a tiny recipe at the tiny setup and a fresh run folder."""
    return [f"model.path={setup['model']}", f"data.shards={setup['shards']}", f"save_folder={folder}",
            f"export_dir={folder}/export", "progress_bar=false", "log_to_console=false"]


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def weights_log(folder):
    return jsonl(os.path.join(folder, "domain_weights.jsonl"))


def run(args, timeout=300, **kw):
    return subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)
