"""`llmshearing eval`: per-domain perplexity equal to transformers' own loss, local lm-eval tasks scored as a
direct computation scores them, and bad input refused with exit code 2 before anything is written."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from llmshearing.cli import main
from llmshearing.eval.evaluate import TASKS_DIR

SHIPPED = os.path.join(TASKS_DIR, "llmshearing_mc.jsonl")
USER_ITEMS = [
    {"question": "The cat sat on the", "options": [" mat.", " integer.", " tuple."], "answer": 0},
    {"question": "def square(x):\n    return x", "options": [" / 0", " * x", "import"], "answer": 1},
    {"question": "Rain falls from the", "options": [" floor.", " import.", " clouds."], "answer": 2},
    {"question": "import os\nos.path", "options": [".join(a, b)", " while", " + class"], "answer": 0},
    {"question": "One, two,", "options": [" three.", " blue.", " def."], "answer": 0},
]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def hf(tiny_setup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_setup["model"], torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_setup["model"])


def eval_split(shards, domain, split="test"):
    """The sequences of a domain's split, read with streaming directly (not through llmshearing.data.layout)."""
    from streaming import LocalDataset

    ds = LocalDataset(local=os.path.join(shards, domain, split))
    return torch.tensor(np.stack([np.asarray(ds[i]["tokens"], dtype=np.int64) for i in range(len(ds))]))


@pytest.mark.slow
def test_perplexity_matches_transformers_loss(tiny_setup, hf, tmp_path, capsys):
    model, _ = hf
    out = tmp_path / "res" / "eval.json"
    # batch size 3 over 4 sequences: a partial last batch must not change the token-weighted mean
    assert main(["eval", tiny_setup["model"], "--shards", tiny_setup["shards"], "--batch-size", "3",
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    (m,) = report["models"]
    assert m["model"] == m["path"] == tiny_setup["model"] and m["gguf_file"] is None
    assert m["parameters"] == sum(p.numel() for p in model.parameters())
    assert list(m["domains"]) == ["prose", "code"] and "tasks" not in m and report["seconds"] > 0
    for domain, got in m["domains"].items():
        ids = eval_split(tiny_setup["shards"], domain)
        with torch.no_grad():
            want = float(model(input_ids=ids, labels=ids).loss)  # HF's own shifted mean over n * (T-1) tokens
        assert got["loss"] == pytest.approx(want, rel=1e-5)
        assert got["ppl"] == pytest.approx(math.exp(want), rel=1e-5)
        assert got["tokens"] == ids.shape[0] * (ids.shape[1] - 1) and got["sequences"] == ids.shape[0]
        assert f"| ppl {domain} | {got['ppl']:.2f} |" in table
    assert m["tokens_evaluated"] == sum(d["tokens"] for d in m["domains"].values())
    assert table.splitlines()[0] == f"| metric | {tiny_setup['model']} |"
    assert report["split"] == "test" and "| shards split | test |" in table  # final numbers: the test split

    # --split eval (what steered training), --domains and --max-sequences select; two models, a column each
    assert main(["eval", tiny_setup["model"], tiny_setup["model"], "--shards", tiny_setup["shards"],
                 "--domains", "code", "--max-sequences", "2", "--split", "eval"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"| metric | {tiny_setup['model']} | {tiny_setup['model']} #2 |"
    assert "| shards split | eval | eval |" in lines
    ids = eval_split(tiny_setup["shards"], "code", "eval")[:2]
    assert not torch.equal(ids, eval_split(tiny_setup["shards"], "code")[:2])
    with torch.no_grad():
        ppl = math.exp(float(model(input_ids=ids, labels=ids).loss))
    assert f"| ppl code | {ppl:.2f} | {ppl:.2f} |" in lines
    assert not any(line.startswith("| ppl prose") for line in lines)


def choice_logprobs(model, tok, pairs) -> list[float]:
    """Sum of log p(choice tokens | context) for each (context, choice), the choice's tokens being those that
    tokenizing context + choice adds after the context's tokens (how lm-eval splits a continuation).
    One right-padded batch: a causal model's logits before the padding do not depend on it."""
    spans, rows = [], []
    for context, choice in pairs:
        whole = tok(context + choice, add_special_tokens=False).input_ids
        spans.append((len(tok(context, add_special_tokens=False).input_ids), len(whole)))
        rows.append(whole)
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)
    return [float(sum(logp[r, i - 1, ids[r, i]] for i in range(a, b))) for r, (a, b) in enumerate(spans)]


def direct_accuracy(model, tok, items, context, choices, label):
    """(acc, acc_norm) as a multiple-choice task defines them: the argmax of the summed log-likelihood,
    and of the log-likelihood per character of the choice (lm-eval's acc_norm)."""
    lls = iter(choice_logprobs(model, tok, [(it[context], c) for it in items for c in it[choices]]))
    acc = acc_norm = 0
    for it in items:
        ll = [next(lls) for _ in it[choices]]
        acc += int(np.argmax(ll) == it[label])
        acc_norm += int(np.argmax([v / len(c) for v, c in zip(ll, it[choices])]) == it[label])
    return acc / len(items), acc_norm / len(items)


@pytest.mark.slow
def test_local_tasks_through_cli(tiny_setup, hf, tmp_path, capsys):
    """The shipped task and a user task (a jsonl named by `dataset_path: json` + data_files) run on the tiny
    model through lm-eval and score exactly what a direct computation with the model gives."""
    pytest.importorskip("lm_eval")
    model, tok = hf
    tasks_dir = tmp_path / "my_tasks"
    tasks_dir.mkdir()
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in USER_ITEMS))
    (tasks_dir / "my_task.yaml").write_text(
        "task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: question\ndoc_to_choice: options\n"
        "doc_to_target: answer\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    out = tmp_path / "tasks.json"
    assert main(["eval", tiny_setup["model"], "--tasks", "llmshearing_mc,my_task", "--include-path", str(tasks_dir),
                 "--batch-size", "8", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["tasks"] == ["llmshearing_mc", "my_task"] and report["lm_eval_version"]
    (m,) = report["models"]
    assert "domains" not in m
    shipped = read_jsonl(SHIPPED)
    for name, items, keys in (("llmshearing_mc", shipped, ("context", "choices", "label")),
                              ("my_task", USER_ITEMS, ("question", "options", "answer"))):
        got = m["tasks"][name]
        assert got["items"] == len(items)
        assert 0 <= got["acc"] <= 1 and 0 <= got["acc_norm"] <= 1 and got["acc_stderr"] > 0
        acc, acc_norm = direct_accuracy(model, tok, items, *keys)
        assert got["acc"] == pytest.approx(acc) and got["acc_norm"] == pytest.approx(acc_norm)
        assert f"| {name} acc | {got['acc']:.3f} ± {got['acc_stderr']:.3f} |" in table
    assert len(shipped) == 50 and all(0 <= it["label"] < len(it["choices"]) == 4 for it in shipped)


@pytest.fixture(scope="module")
def foreign_shards(tiny_setup, tmp_path_factory):
    """The tiny shards, labelled as built with a tokenizer of another vocabulary."""
    root = tmp_path_factory.mktemp("foreign") / "shards"
    shutil.copytree(tiny_setup["shards"], root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0123456789abcdef"
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


@pytest.mark.parametrize("case, message", [
    ("missing_model", "does not exist or is not a folder"),
    ("not_a_model", "is not an HF model folder: no config.json"),
    ("foreign_shards", "vocabulary differs"),
    ("unknown_domain", "domain 'web' has no shards"),
    ("no_shards", "no shards at"),
    ("nothing", "nothing to evaluate"),
    ("unknown_task", "unknown task(s) no_such_task"),
    ("bad_include", "--include-path"),
    ("task_data_missing", "cannot build task 'broken': FileNotFoundError"),
    ("out_is_dir", "is a folder"),
])
def test_cli_errors(case, message, tiny_setup, foreign_shards, tmp_path, capsys):
    model, shards, out = tiny_setup["model"], tiny_setup["shards"], tmp_path / "out.json"
    args = {
        "missing_model": [str(tmp_path / "nope"), "--shards", shards],
        "not_a_model": [str(tmp_path), "--shards", shards],
        "foreign_shards": [model, "--shards", foreign_shards],
        "unknown_domain": [model, "--shards", shards, "--domains", "prose,web"],
        "no_shards": [model, "--shards", str(tmp_path / "no-shards")],
        "nothing": [model],
        "unknown_task": [model, "--tasks", "llmshearing_mc,no_such_task"],
        "bad_include": [model, "--tasks", "llmshearing_mc", "--include-path", str(tmp_path / "none")],
        "out_is_dir": [model, "--shards", shards],
        "task_data_missing": [model, "--tasks", "broken", "--include-path", str(tmp_path)],
    }[case]
    if case in ("unknown_task", "bad_include", "task_data_missing"):
        pytest.importorskip("lm_eval")
    if case == "task_data_missing":  # a valid yaml whose jsonl is not there
        (tmp_path / "broken.yaml").write_text(
            f"task: broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gone.jsonl'}\n"
            "output_type: multiple_choice\ntest_split: test\ndoc_to_text: q\ndoc_to_choice: c\ndoc_to_target: a\n")
    if case == "out_is_dir":
        out.mkdir()
    assert main(["eval", *args, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err and "Traceback" not in captured.err
    assert captured.out == "" and (case == "out_is_dir" or not out.exists())


def test_tasks_without_lm_eval_name_the_extra(tiny_setup, tmp_path, capsys, monkeypatch):
    """Without lm-eval importable (None in sys.modules makes `import lm_eval` fail), --tasks names the extra."""
    import sys

    for name in [n for n in sys.modules if n == "lm_eval" or n.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["eval", tiny_setup["model"], "--tasks", "llmshearing_mc", "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "lm-evaluation-harness" in err and "pip install -e '.[eval]'" in err and not (tmp_path / "o.json").exists()


def test_shards_without_a_test_split_are_a_one_line_error(tiny_setup, tmp_path, capsys):
    """Shards built before the test split existed: `llmshearing eval` says how to rebuild them, no traceback."""
    from conftest import shards_before_the_test_split

    old = shards_before_the_test_split(tiny_setup["shards"], tmp_path / "shards")
    assert main(["eval", tiny_setup["model"], "--shards", old]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no 'test' split" in err and "make shards" in err and "Traceback" not in err
    with pytest.raises(SystemExit, match="2"):  # argparse: only test or eval
        main(["eval", tiny_setup["model"], "--shards", old, "--split", "prune"])
    assert "invalid choice: 'prune'" in capsys.readouterr().err


def test_the_test_split_is_never_read_by_training_steering_or_calibration(tiny_setup):
    """Training data, the reference losses (dynamic loading's targets) and activation calibration refuse `test`."""
    from llmshearing.data.mixture import DomainMixture
    from llmshearing.errors import ConfigError
    from llmshearing.experiments.reference_losses import source_reference_losses
    from llmshearing.pruning.oneshot import calibration_ids
    from llmshearing.train.config import load_config

    from conftest import REPO

    shards = tiny_setup["shards"]
    recipe, paths = os.path.join(REPO, "yamls", "testing", "prune_tiny.yaml"), [f"model.path={tiny_setup['model']}",
                                                                               f"data.shards={shards}"]
    for refused, who in (
            (lambda: load_config(recipe, paths + ["data.split=test"]), "data.split"),
            (lambda: DomainMixture(shards, "test", ["prose"], [1.0], batch_size=2, seed=0), "training data"),
            (lambda: source_reference_losses(tiny_setup["model"], shards, split="test"), "reference losses"),
            (lambda: calibration_ids(shards, per_domain=2, split="test"), "activation calibration")):
        with pytest.raises(ConfigError, match=f"{who}: the 'test' split is reserved for final numbers"):
            refused()
    assert calibration_ids(shards, per_domain=2).shape[0] == 4  # the prune split, as before
