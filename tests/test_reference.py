"""Reference losses: the scaling-law fit, per-domain eval loss on shards, and `llmshearing reference-loss`."""
import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

from llmshearing.cli import main
from llmshearing.errors import ConfigError
from llmshearing.eval.evaluate import domain_losses, markdown_table, perplexities
from llmshearing.experiments.reference_losses import (fit_scaling_law, PAPER_REFERENCE_LOSSES, predict_reference_losses, reference_snippet, source_reference_losses)
from llmshearing.pruning.budget import parse_count
from llmshearing.data.layout import FORMAT, REDPAJAMA_PROPORTIONS
from llmshearing.data.tokenizer import tokenizer_fingerprint

SIZES = {"m-70m": 7.0e7, "m-410m": 4.05e8, "m-1.4b": 1.41e9, "m-2.8b": 2.78e9, "m-6.9b": 6.9e9}
LAWS = {"common_crawl": (410.0, 0.35, 1.6), "github": (3.0e3, 0.7, 0.5), "book": (25.0, 0.2, 1.2)}


def law(a, b, c, n):
    return a / n ** b + c


def table(names=("m-410m", "m-1.4b", "m-2.8b")):
    return {"sizes": {n: SIZES[n] for n in names},
            "losses": {d: {n: law(*p, SIZES[n]) for n in names} for d, p in LAWS.items()}}


# ---------------------------------------------------------------------------------------------- the fit

@pytest.mark.parametrize("abc", [(410.0, 0.35, 1.6), (3.0e3, 0.7, 0.5), (5.0, 0.05, 1.0), (1e9, 1.5, 2.0)])
def test_fit_interpolates_three_points(abc):
    sizes = [4.05e8, 1.41e9, 2.78e9]
    fit = fit_scaling_law(sizes, [law(*abc, n) for n in sizes])
    assert fit == pytest.approx(abc, rel=1e-6)


def test_fit_least_squares_five_points():
    sizes = list(SIZES.values())
    fit = fit_scaling_law(sizes, [law(410.0, 0.35, 1.6, n) for n in sizes])
    assert fit == pytest.approx((410.0, 0.35, 1.6), rel=1e-6)
    # noisy points: still a good fit near the truth, and exactly the least-squares optimum over (a, c) at its b
    rng = np.random.default_rng(0)
    noisy = [law(410.0, 0.35, 1.6, n) + e for n, e in zip(sizes, rng.normal(0, 1e-3, len(sizes)))]
    a, b, c = fit_scaling_law(sizes, noisy)
    sse = lambda a, b, c: sum((law(a, b, c, n) - y) ** 2 for n, y in zip(sizes, noisy))  # noqa: E731
    for db in (-1e-3, 1e-3):
        z = np.array(sizes) ** -(b + db)
        coef = np.linalg.lstsq(np.stack([z, np.ones_like(z)], 1), np.array(noisy), rcond=None)[0]
        assert sse(a, b, c) <= sse(coef[0], b + db, coef[1]) + 1e-15
    assert abs(law(a, b, c, 1.3e9) - law(410.0, 0.35, 1.6, 1.3e9)) < 5e-3


def test_fit_errors():
    with pytest.raises(ConfigError, match="at least 3 different sizes"):
        fit_scaling_law([4e8, 1.4e9], [2.3, 2.1])
    with pytest.raises(ConfigError, match="at least 3 different sizes"):
        fit_scaling_law([4e8, 4e8, 1.4e9], [2.3, 2.3, 2.1])
    with pytest.raises(ConfigError, match="do not decrease"):
        fit_scaling_law([4e8, 1.4e9, 2.8e9], [2.0, 2.1, 2.3])
    with pytest.raises(ConfigError, match="positive parameter counts"):
        fit_scaling_law([-4e8, 1.4e9, 2.8e9], [2.3, 2.1, 2.0])


def test_predict_from_table_and_file(tmp_path):
    pred = predict_reference_losses(table(), 1.3e9)
    assert list(pred) == list(LAWS)
    for d, p in LAWS.items():
        assert pred[d] == pytest.approx(law(*p, 1.3e9), rel=1e-8)
    # a yaml file as written by hand: PyYAML reads 4.05e8 as a string; counts like '1.4B' are accepted
    path = tmp_path / "fit.yaml"
    path.write_text("sizes: {m-410m: 4.05e8, m-1.4b: 1.41B, m-2.8b: 2780M}\n"
                    "losses:\n" + "".join(f"  {d}: {{" + ", ".join(f"{n}: {v!r}" for n, v in per.items()) + "}\n"
                                          for d, per in table()["losses"].items()))
    assert predict_reference_losses(str(path), "1.3B", domains=["github"]) == {"github": pytest.approx(pred["github"])}
    assert parse_count("410M") == 4.1e8 and parse_count(7e7) == 7e7


def test_predict_errors():
    t = table()
    with pytest.raises(ConfigError, match="at least 3 sizes"):
        predict_reference_losses(table(("m-410m", "m-1.4b")), 1.3e9)
    t["losses"]["github"]["m-6.9b"] = 0.4
    with pytest.raises(ConfigError, match=r"losses\.github\.m-6\.9b: model 'm-6\.9b' has no size"):
        predict_reference_losses(t, 1.3e9)
    t = table()
    t["sizes"]["m-410m"] = 0
    with pytest.raises(ConfigError, match=r"sizes\.m-410m: expected a positive number"):
        predict_reference_losses(t, 1.3e9)
    t = table()
    t["losses"]["book"] = {"m-410m": 2.0, "m-1.4b": 2.1, "m-2.8b": 2.2}
    with pytest.raises(ConfigError, match=r"losses\.book: .*do not decrease"):
        predict_reference_losses(t, 1.3e9)
    t = table()
    del t["losses"]["book"]["m-2.8b"]
    with pytest.raises(ConfigError, match=r"losses\.book: needs the losses of at least 3"):
        predict_reference_losses(t, 1.3e9)
    with pytest.raises(ConfigError, match="target parameter count"):
        predict_reference_losses(table(), -1)
    with pytest.raises(ConfigError, match="'sizes"):
        predict_reference_losses({"losses": {}}, 1e9)


def test_snippet_and_paper_values():
    text = reference_snippet({"common_crawl": 1.96431, "c4-rp": 2.0, "yes": 1.0}, "a test\nof two lines")
    assert text.splitlines()[0] == "# reference losses: a test of two lines"
    assert yaml.safe_load(text) == {"reference_losses": {"common_crawl": 1.9643, "c4-rp": 2.0, "yes": 1.0}}
    assert "common_crawl: 1.9643, c4-rp: 2.0000" in text
    for losses in PAPER_REFERENCE_LOSSES.values():
        assert list(losses) == list(REDPAJAMA_PROPORTIONS)
    smaller, larger = PAPER_REFERENCE_LOSSES["sheared-llama-1.3b"], PAPER_REFERENCE_LOSSES["sheared-llama-2.7b"]
    assert all(larger[d] < smaller[d] for d in smaller)


# ---------------------------------------------------------------------------------------------- eval loss

SEQ = 16


def write_shards(root, tokenizer_info: dict, domains: dict[str, np.ndarray]) -> str:
    """A shard folder per `llmshearing.data.layout`: each domain's `eval` split holds the given (n, SEQ) ids."""
    from streaming import MDSWriter

    info = {}
    for name, ids in domains.items():
        with MDSWriter(out=os.path.join(root, name, "eval"), columns={"tokens": f"ndarray:uint16:{SEQ}"}) as w:
            for row in ids:
                w.write({"tokens": row.astype(np.uint16)})
        info[name] = {"proportion": 1 / len(domains), "splits": {"eval": {"sequences": len(ids), "tokens": ids.size}}}
    manifest = {"format": FORMAT, "seq_len": SEQ, "dtype": "uint16", "tokenizer": tokenizer_info, "domains": info}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(root)


@pytest.fixture(scope="module")
def tiny(tiny_setup, tmp_path_factory):
    """The tiny model (via transformers), its tokenizer info, and shards of 2 domains with 7 and 5 sequences."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tiny_setup["model"], torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_setup["model"])
    info = {"path": tiny_setup["model"], "vocab_size": len(tok), "fingerprint": tokenizer_fingerprint(tok)}
    rng = np.random.default_rng(0)
    ids = {"prose": rng.integers(0, len(tok), (7, SEQ)), "code": rng.integers(0, len(tok), (5, SEQ))}
    root = write_shards(tmp_path_factory.mktemp("shards"), info, ids)
    return {"hf": hf, "info": info, "ids": ids, "root": root, "model": tiny_setup["model"]}


def direct_loss(hf, ids: np.ndarray) -> float:
    with torch.no_grad():
        x = torch.tensor(ids, dtype=torch.long)
        logits = hf(x).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)))


def test_domain_losses_match_transformers(tiny):
    hf, ids = tiny["hf"], tiny["ids"]
    losses = domain_losses(lambda x: hf(x).logits, tiny["root"], batch_size=3)
    assert list(losses) == ["prose", "code"]  # manifest order
    for d in ids:
        assert losses[d] == pytest.approx(direct_loss(hf, ids[d]), abs=1e-5)
    # batch size does not change the token-weighted mean; max_sequences takes the first N; domains select
    first = domain_losses(lambda x: hf(x).logits, tiny["root"], ["code"], max_sequences=2, batch_size=1, progress=True)
    assert first == {"code": pytest.approx(direct_loss(hf, ids["code"][:2]), abs=1e-5)}
    assert perplexities({"code": math.log(3.0)}) == {"code": pytest.approx(3.0)}
    table_md = markdown_table({"m": losses, "n": {"code": 1.0}}, fmt="{:.3f}")
    assert table_md.splitlines()[0] == "| model | prose | code |" and table_md.splitlines()[-1] == "| n | - | 1.000 |"
    with pytest.raises(ConfigError, match="domain 'web' has no shards"):
        domain_losses(lambda x: hf(x).logits, tiny["root"], ["web"])
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        domain_losses(lambda x: hf(x).logits, tiny["root"], batch_size=0)


def test_source_reference_losses_and_cli(tiny, tmp_path, capsys):
    """Our from_pretrained model gives the transformers numbers; the CLI writes them as a snippet."""
    losses = source_reference_losses(tiny["model"], tiny["root"], batch_size=4)
    for d, ids in tiny["ids"].items():
        assert losses[d] == pytest.approx(direct_loss(tiny["hf"], ids), abs=1e-5)
    out = tmp_path / "ref" / "reference_losses.yaml"
    assert main(["reference-loss", "--model", tiny["model"], "--shards", tiny["root"], "--domains", "code",
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(f"# reference losses: mean next-token loss (nats/token) of the source model {tiny['model']}")
    assert yaml.safe_load(text) == {"reference_losses": {"code": round(losses["code"], 4)}}


def test_source_vocab_and_tokenizer_mismatch(tiny, tmp_path):
    ids = {"prose": tiny["ids"]["prose"]}
    big = write_shards(tmp_path / "big", {**tiny["info"], "vocab_size": 10**5}, ids)
    with pytest.raises(ConfigError, match="tokenizer vocab larger than the model's embedding"):
        source_reference_losses(tiny["model"], big)
    other = write_shards(tmp_path / "other", {**tiny["info"], "fingerprint": "0123"}, ids)
    with pytest.raises(ConfigError, match="vocabulary differs"):
        source_reference_losses(tiny["model"], other)


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_fit_prints_snippet(tmp_path, capsys):
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(table()))
    assert main(["reference-loss", "--fit", str(path), "--target-params", "1.3e9"]) == 0
    text = capsys.readouterr().out
    got = yaml.safe_load(text)["reference_losses"]
    assert list(got) == list(LAWS)
    assert got == {d: round(law(*p, 1.3e9), 4) for d, p in LAWS.items()}
    assert "predicted at N = 1.3e+09 parameters" in text and str(path) in text


def test_cli_fit_target_preset(tmp_path, capsys, tiny):
    """--target counts parameters with pruning.shapes.param_count: a config path on its own, a preset against --model."""
    from transformers import AutoConfig

    from llmshearing.pruning.shapes import param_count, shape_of

    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(table()))
    config = AutoConfig.from_pretrained(tiny["model"])
    n = param_count(shape_of(config), config)
    assert main(["reference-loss", "--fit", str(path), "--target", tiny["model"], "--domains", "book"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {"reference_losses": {"book": round(law(*LAWS["book"], n), 4)}}
    assert main(["reference-loss", "--fit", str(path), "--target", "sheared-llama-1.3b"]) == 2
    assert "give --model SOURCE_DIR too" in capsys.readouterr().err


def test_cli_paper(capsys):
    assert main(["reference-loss", "--paper", "sheared-llama-2.7b"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["reference_losses"] == PAPER_REFERENCE_LOSSES["sheared-llama-2.7b"]


@pytest.mark.parametrize("args, message", [
    ([], "needs --model DIR with --shards DIR or --remote URI --local DIR"),
    (["--model", "m"], "needs --model DIR with --shards DIR or --remote URI --local DIR"),
    (["--fit", "f.yaml"], "exactly one of --target-params"),
    (["--fit", "f.yaml", "--target-params", "1e9", "--target", "x"], "exactly one of --target-params"),
    (["--fit", "f.yaml", "--target-params", "1e9", "--shards", "s"], "--fit takes no --shards"),
    (["--fit", "missing.yaml", "--target-params", "1e9"], "'missing.yaml' does not exist"),
    (["--fit", "f.yaml", "--target", "nope"], "neither a preset"),
    (["--model", "m", "--shards", "s", "--target-params", "1e9"], "only go with --fit"),
    (["--model", "m", "--shards", "no-such-shards"], "no shards at 'no-such-shards'"),
    (["--paper", "llama-9b"], "unknown 'llama-9b'"),
])
def test_cli_errors(args, message, capsys):
    assert main(["reference-loss", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_bad_fit_values(tmp_path, capsys):
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(table(("m-410m", "m-1.4b"))))
    assert main(["reference-loss", "--fit", str(path), "--target-params", "1.3e9"]) == 2
    assert "at least 3 sizes" in capsys.readouterr().err
    assert main(["reference-loss", "--fit", str(path), "--target-params", "lots"]) == 2
    assert "expected a positive number of parameters" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's own errors: usage on stderr, exit 2
        main(["reference-loss", "--max-sequences", "many"])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err
