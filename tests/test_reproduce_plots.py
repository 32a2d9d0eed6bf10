"""`reproduce --plot-scales` on summaries written by hand (no training): which points become one line."""
import json
import math

import pytest

from llmshearing.errors import ConfigError
from llmshearing.experiments.reproduce import plot_scales

HELD = ["prune.pruning.lambda_optimizer=sgd", "prune.pruning.lambda_lr=10"]


def summary(path, tokens, losses, overrides=()):
    """A summary.json of one run: sheared_act (a pruning stage) and oneshot_act_kd (none), with per-seed losses."""
    arms = {name: {"init": init, "total_tokens": tokens, "final_mean_loss_by_seed": by_seed}
            for (name, init), by_seed in zip((("sheared_act", "l0"), ("oneshot_act_kd", "activation")), losses)}
    with open(path, "w") as f:
        json.dump({"split": "test", "settings": {"seed": 17, "overrides": list(overrides)}, "arms": arms}, f)
    return str(path)


def test_an_arm_run_with_pruning_overrides_is_its_own_line_and_one_shot_arms_are_not_split(tmp_path):
    paths = [summary(tmp_path / "a.json", 100, [{"17": 5.0, "18": 5.2}, {"17": 5.1}]),
             summary(tmp_path / "b.json", 100, [{"17": 4.9}, {"17": 4.0}], HELD),  # the same budget, another recipe
             summary(tmp_path / "c.json", 300, [{"17": 4.5}, {"17": 4.6}], HELD)]
    with pytest.raises(ConfigError, match="'oneshot_act_kd' at 100 tokens is in two summaries"):
        plot_scales(paths, str(tmp_path / "plots"))  # prune. overrides do not reach a one-shot arm: the same arm twice
    arms = plot_scales([paths[0], paths[2]], str(tmp_path / "plots"))["arms"]
    held = "sheared_act (pruning.lambda_optimizer=sgd pruning.lambda_lr=10)"
    assert sorted(arms) == sorted(["sheared_act", held, "oneshot_act_kd"])
    assert [p["tokens"] for p in arms["oneshot_act_kd"]] == [100, 300]
    assert [p["tokens"] for p in arms[held]] == [300] and arms[held][0]["perplexity"] == pytest.approx(math.exp(4.5))
    assert arms["sheared_act"][0]["perplexity"] == pytest.approx(math.exp(5.1))
    assert arms["sheared_act"][0]["perplexity_range"] == pytest.approx([math.exp(5.0), math.exp(5.2)])
    assert (tmp_path / "plots" / "scales.png").stat().st_size > 0
