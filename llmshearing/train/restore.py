"""A training run read back from its Composer checkpoint: its run config (embedded, or given) and its student model
with masks (`llmshearing export`, `eval`, the demo). Above the checkpoint files (`checkpoint_files.py`) and the
builders, which it uses."""
from __future__ import annotations

import os

import torch
from omegaconf import OmegaConf

from llmshearing.checks import check_checkpoint, load_structured
from llmshearing.compat import CheckpointModel
from llmshearing.errors import ConfigError
from llmshearing.train.builders import build_model
from llmshearing.checkpoint_files import read_tensor, unreadable
from llmshearing.train.composer_model import student_state
from llmshearing.train.config import from_mapping, TrainConfig


def open_checkpoint(checkpoint: str, config_path: str | None = None, model_path: str | None = None):
    """(run config, CheckpointModel) of a Composer checkpoint of a pruning or continued-pretraining run; nothing
    but the run config is read yet (the model tensors are read when asked for, see compat.CheckpointModel).

    The checkpoint carries its run's resolved config (model, tokenizer, target) and every weight; the source model
    folder (model.path) is read for its config.json and tokenizer, `model_path` where it has moved since the run.
    `config_path` overrides the embedded config, and the run folder's `run_config.yaml` is read only for checkpoints
    written before configs were embedded.
    """
    checkpoint = check_checkpoint(checkpoint, "checkpoint")  # latest-rank0.pt may link to a sharded folder
    try:
        reader = CheckpointModel(checkpoint)
        embedded = reader.value("callbacks", "RunGuard", "run_config")
    except Exception as e:  # noqa: BLE001 - torch/DCP fail in many ways on a damaged file; name it
        raise unreadable(checkpoint, e) from None
    if config_path is not None:
        raw = load_structured(config_path, "--config")
    elif embedded is not None:
        raw = OmegaConf.to_container(OmegaConf.create(embedded), resolve=True)
    else:
        config_path = os.path.join(os.path.dirname(checkpoint), "run_config.yaml")
        if not os.path.exists(config_path):
            raise ConfigError(f"checkpoint '{checkpoint}' carries no run config and there is none at "
                              f"'{config_path}'; pass --config <run_config.yaml> of the training run")
        raw = load_structured(config_path, "--config")
    cfg = from_mapping(TrainConfig, raw, "")
    if model_path is not None:
        cfg.model.path = model_path
    if not os.path.exists(cfg.model.path):
        how = ("--model-path names a folder that does not exist" if model_path is not None else
               "it has moved or been deleted since the run; pass --model-path <the folder where it is now>")
        raise ConfigError(f"checkpoint '{checkpoint}': its source model '{cfg.model.path}' (model.path of the run, "
                          f"read for its config.json and tokenizer; the weights come from the checkpoint) is not "
                          f"there: {how}")
    return cfg, reader


def load_checkpoint(checkpoint: str, config_path: str | None = None):
    """(run config, ComposerLM) from a Composer checkpoint of a pruning or continued-pretraining run: the student
    and its masks (never the teacher or the optimizer state), copied tensor by tensor into the model (host peak:
    one model plus one tensor)."""
    cfg, reader = open_checkpoint(checkpoint, config_path)
    model = build_model(cfg, load_weights=False)
    params = model.state_dict(keep_vars=True)
    stored = set(student_state(dict.fromkeys(reader.names)))
    if stored != set(params):
        missing, unexpected = sorted(set(params) - stored), sorted(stored - set(params))
        raise ConfigError(f"checkpoint '{reader.path}' does not fit the model of its run config (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}); pass the run's own --config")
    with torch.no_grad():
        for name, param in params.items():
            value = read_tensor(reader, name)
            if value.shape != param.shape:
                raise ConfigError(f"checkpoint '{reader.path}' does not fit the model of its run config ({name}: "
                                  f"{tuple(value.shape)} stored, {tuple(param.shape)} expected); pass the run's "
                                  f"own --config")
            param.copy_(value)
    return cfg, model.eval()
