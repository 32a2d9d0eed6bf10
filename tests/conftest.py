import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llmshearing.tiny import FAMILY_CONFIGS, make_tiny  # noqa: E402

FAMILIES = list(FAMILY_CONFIGS)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """The `make tiny` folder: model/ (GQA, tied embeddings), text/{prose,code}.jsonl and their shards/."""
    return make_tiny(str(tmp_path_factory.mktemp("tiny")), "smollm2-gqa")
