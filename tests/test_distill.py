"""Distillation (`distill:`): the KD loss against a hand computation, the frozen teacher, alpha = 0 equals the plain
run bit for bit, the logged losses, bad input, and a 2-process FSDP run equal to the 1-process run."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from conftest import CONTINUE_YAML, TINY_YAML, jsonl, paths, run, weights_log
from safetensors.torch import load_file
from test_bad_input import refused, snapshot, tiny, train  # noqa: F401 - `tiny` is a fixture
from test_fsdp import BUILD_AND_CHAIN, FSDP_YAML, ok, two_procs

from llmshearing.compat import checkpoint_state
from llmshearing.data.tokenizer import load_tokenizer
from llmshearing.experiments.tiny import domain_texts, random_model, train_tokenizer
from llmshearing.train.composer_model import ChunkedCrossEntropy, ChunkedPerplexity, ComposerLM
from llmshearing.model.distill import Teacher, kd_loss, lm_loss
from llmshearing.model.hf import load_hf_config
from llmshearing.model.loading import from_pretrained
from llmshearing.pruning.masks import L0Module
from llmshearing.pruning.shapes import shape_of
from llmshearing.pruning.target import resolve_target
from llmshearing.train.restore import load_checkpoint
from llmshearing.train.run import main as train_main

TARGET = {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
          "intermediate_size": 64}


# ------------------------------------------------------------------------------------------- the loss

def hand_kd(student, teacher, labels, T, k=None):
    """T^2 * mean over positions with label != -100 of sum_i p_i (log p_i - log q_i), p and q the softmax of the
    teacher's and student's logits / T over all ids, or over the teacher's k largest ids; plain Python floats."""
    total, n = 0.0, 0
    for b in range(len(labels)):
        for pos in range(len(labels[b])):
            if labels[b][pos] == -100:
                continue
            zt, zs = teacher[b][pos], student[b][pos]
            ids = sorted(range(len(zt)), key=lambda i: -zt[i])[:k] if k else range(len(zt))
            et = [math.exp(zt[i] / T) for i in ids]
            es = [math.exp(zs[i] / T) for i in ids]
            p = [e / sum(et) for e in et]
            q = [e / sum(es) for e in es]
            total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
            n += 1
    return T * T * total / n


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("k", [None, 1, 3, 7])
def test_kd_loss_equals_a_hand_computation(T, k):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(0, 2, (2, 4, 7)), rng.normal(0, 2, (2, 4, 7))
    labels = np.array([[1, -100, 3, 0], [-100, 6, -100, 2]])
    got = kd_loss(torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32),
                  torch.tensor(labels), T, k)
    want = hand_kd(student.tolist(), teacher.tolist(), labels.tolist(), T, k)
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-7)
    if k == 1:
        assert float(got) == 0.0  # one token renormalised is probability 1 for both
    if k == 7:  # the whole vocabulary: the full KL
        assert float(got) == pytest.approx(hand_kd(student.tolist(), teacher.tolist(), labels.tolist(), T), rel=1e-5)


def autograd_kd(student, teacher, labels, T, k):
    """The KD formula written plainly, for autograd to differentiate (what kd_loss's own backward must equal)."""
    keep = labels != -100
    s, t = student[keep].float() / T, teacher[keep].float() / T
    if k is not None and k < t.shape[-1]:
        t, idx = t.topk(k, dim=-1)
        s = s.gather(-1, idx)
    t_logp, s_logp = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    return T * T * (t_logp.exp() * (t_logp - s_logp)).sum() / keep.sum().clamp(min=1)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("k", [None, 1, 5, 40])
@pytest.mark.parametrize("chunk_elements", [2**22, 120])
def test_kd_loss_gradient_equals_autograd(T, k, chunk_elements, monkeypatch):
    """kd_loss computes its gradient itself, a chunk of positions at a time (to keep 4 bytes per position and
    token instead of 28): it equals autograd's through the plain formula, in one chunk and in many, on a
    non-contiguous bf16 student view with ignored positions, as ComposerLM.loss passes it."""
    from llmshearing.model import distill

    monkeypatch.setattr(distill, "KD_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    outputs = (3 * torch.randn(3, 9, 40)).to(torch.bfloat16).requires_grad_()
    teacher = (3 * torch.randn(3, 8, 40)).to(torch.bfloat16)
    labels = torch.randint(0, 40, (3, 8))
    labels[0, :5] = -100
    labels[2, 3] = -100
    got = kd_loss(outputs[:, :-1], teacher, labels, T, k)
    (got_grad,) = torch.autograd.grad(3 * got, outputs)
    want = autograd_kd(outputs[:, :-1], teacher, labels, T, k)
    (want_grad,) = torch.autograd.grad(3 * want, outputs)
    assert float(got) == pytest.approx(float(want), rel=1e-6, abs=1e-7)
    assert got_grad.dtype == torch.bfloat16 and got_grad.shape == outputs.shape
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-2, atol=1e-5)  # bf16 gradients
    assert not got_grad[0, :5].any() and not got_grad[:, -1].any()  # ignored and unlabelled positions
    student = outputs.detach().float()[:, :-1].requires_grad_()
    (g32,) = torch.autograd.grad(kd_loss(student, teacher, labels, T, k), student)
    (w32,) = torch.autograd.grad(autograd_kd(student, teacher, labels, T, k), student)
    torch.testing.assert_close(g32, w32, rtol=1e-5, atol=1e-8)


def test_kd_loss_known_values_and_ignored_positions():
    # teacher (0, 0) -> p = (1/2, 1/2); student (0, ln 3) -> q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    s, t = torch.tensor([[[0.0, math.log(3)]]]), torch.zeros(1, 1, 2)
    assert float(kd_loss(s, t, torch.tensor([[0]]))) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # at T = 2, q = (1, sqrt 3) / (1 + sqrt 3), times T^2 = 4
    q = np.array([1, math.sqrt(3)]) / (1 + math.sqrt(3))
    assert float(kd_loss(s, t, torch.tensor([[0]]), 2.0)) == pytest.approx(4 * float(np.sum(0.5 * np.log(0.5 / q))), rel=1e-6)
    # an ignored position counts neither in the sum nor in the mean, whatever its logits
    s2, t2 = torch.cat([s, torch.tensor([[[9.0, -9.0]]])], 1), torch.cat([t, torch.tensor([[[-5.0, 5.0]]])], 1)
    assert float(kd_loss(s2, t2, torch.tensor([[0, -100]]))) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert float(kd_loss(s2, t2, torch.tensor([[-100, -100]]))) == 0.0


@pytest.mark.parametrize("chunk_elements", [2**22, 120, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lm_loss_equals_cross_entropy_in_value_and_gradient(chunk_elements, dtype, monkeypatch):
    """lm_loss (a chunk of positions at a time, fp32 per chunk only) equals F.cross_entropy on the fp32 logits
    with ignore_index=-100, value and gradient, in one chunk and in many (40 elements: one position a chunk), on
    a non-contiguous view with ignored positions and a wholly ignored chunk; the gradient comes back in the
    logits' dtype, zero on ignored positions."""
    from llmshearing.model import distill

    monkeypatch.setattr(distill, "KD_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    outputs = (3 * torch.randn(3, 9, 40)).to(dtype).requires_grad_()
    labels = torch.randint(0, 40, (3, 8))
    labels[0, :] = -100  # a whole sequence ignored: whole chunks of ignored positions
    labels[2, 3] = -100
    got = lm_loss(outputs[:, :-1], labels)
    (got_grad,) = torch.autograd.grad(3 * got, outputs)
    logits = outputs[:, :-1].float()
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1), ignore_index=-100)
    (want_grad,) = torch.autograd.grad(3 * want, outputs)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert got_grad.dtype == dtype and got_grad.shape == outputs.shape
    tol = dict(rtol=1e-2, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(got_grad, want_grad, **tol)
    assert not got_grad[0].any() and not got_grad[:, -1].any() and not got_grad[2, 3].any()


def test_lm_loss_known_values_and_all_ignored():
    # logits (0, ln 3): softmax (1/4, 3/4); label 1 -> ln(4/3), label 0 -> ln 4; the mean of both
    s = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]], requires_grad=True)
    assert float(lm_loss(s, torch.tensor([[1, 0]]))) == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, rel=1e-6)
    assert float(lm_loss(s, torch.tensor([[1, -100]]))) == pytest.approx(math.log(4 / 3), rel=1e-6)
    nothing = lm_loss(s, torch.tensor([[-100, -100]]))  # no kept position: 0 and a zero gradient, never NaN
    (g,) = torch.autograd.grad(nothing, s)
    assert float(nothing) == 0.0 and not g.any()


def test_chunked_metrics_equal_composers(monkeypatch):
    """The metrics ComposerLM logs (updated a chunk at a time without a contiguous fp32 copy) equal Composer's
    LanguageCrossEntropy / LanguagePerplexity on the same outputs, over two updates."""
    from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity

    from llmshearing.model import distill

    monkeypatch.setattr(distill, "KD_CHUNK_ELEMENTS", 80)
    torch.manual_seed(1)
    pairs = [(3 * torch.randn(2, 6, 40)[:, :-1], torch.randint(0, 40, (2, 5))) for _ in range(2)]
    pairs[1][1][1, :] = -100
    for ours, theirs in [(ChunkedCrossEntropy(), LanguageCrossEntropy()), (ChunkedPerplexity(), LanguagePerplexity())]:
        for out, lab in pairs:
            ours.update(out, lab)
            theirs.update(out.contiguous(), lab)
        assert float(ours.compute()) == pytest.approx(float(theirs.compute()), rel=1e-6)
        assert int(ours.total_items) == int(theirs.total_items) == 15


# ------------------------------------------------------------------------------------- the teacher

def test_teacher_is_frozen_in_eval_mode_and_outside_the_optimizer(tiny_setup):
    """One training step of a pruning ComposerLM with a teacher: the teacher gets no gradient and no optimizer
    state, is in no param group, stays in eval mode and keeps its weights; the student trains; the loss is
    (1 - alpha) * ce + alpha * kd + lagrangian."""
    source = load_hf_config(tiny_setup["model"])
    target = resolve_target(TARGET, source)
    teacher = Teacher(from_pretrained(tiny_setup["model"], attn_impl="sdpa"), alpha=0.25, temperature=2.0)
    model = ComposerLM(from_pretrained(tiny_setup["model"], attn_impl="sdpa"),
                       L0Module(shape_of(source), target, init_drop=0.5), teacher)
    model.train()
    assert model.model.training and model.l0.training
    assert not any(m.training for m in teacher.modules())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    opt = torch.optim.AdamW(model.param_groups(1e-2, 0.1, 0.1, 0.1))
    frozen = {id(p) for p in teacher.parameters()}
    assert not frozen & {id(p) for g in opt.param_groups for p in g["params"]}
    ids = torch.randint(0, source.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "batch_index": torch.tensor([0, 0])}
    loss = model.loss(model(batch), batch)
    assert set(loss) == {"total", "ce", "kd", "lm", "lagrangian"} and loss["kd"] > 0
    assert float(loss["ce"]) == float(loss["lm"])
    assert float(loss["total"]) == pytest.approx(float(0.75 * loss["ce"] + 0.25 * loss["kd"] + loss["lagrangian"]), rel=1e-6)
    loss["total"].backward()
    opt.step()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not frozen & {id(p) for p in opt.state}
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in model.model.state_dict().items())


def test_a_teacher_equal_to_the_student_distils_nothing(tiny_setup):
    """Why `teacher: source` is refused without pruning: the unmasked source as teacher of itself gives kd = 0
    and no KD gradient."""
    lm = from_pretrained(tiny_setup["model"], attn_impl="sdpa")
    model = ComposerLM(lm, None, Teacher(from_pretrained(tiny_setup["model"], attn_impl="sdpa"), alpha=1.0))
    ids = torch.randint(0, lm.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model.loss(model({"input_ids": ids}), {"input_ids": ids, "labels": ids})
    assert set(loss) == {"total", "ce", "kd"} and float(loss["kd"]) == 0.0 and float(loss["total"]) == 0.0


# ------------------------------------------------------------------------------------- training runs

def _run(tiny_setup, folder, *extra, recipe=TINY_YAML):
    common = ["max_duration=6ba", "eval_interval=3ba", "save_interval=3ba", "data.num_workers=0", "export_dir=null"]
    assert train_main([recipe, *paths(tiny_setup, folder), *common, *extra]) == 0


def _state(folder, batch=6):
    return checkpoint_state(os.path.join(folder, f"ep0-ba{batch}-rank0.pt"))


@pytest.mark.slow
def test_alpha_zero_is_the_plain_run_bit_for_bit(tiny_setup, tmp_path):
    """Pruning with distill.alpha=0 (the teacher runs and its KD is logged, with weight 0) trains exactly the
    plain run: the same losses, multipliers, eval losses, domain weights and final weights; the checkpoint holds
    the teacher unchanged (the source's weights) and no optimizer state for it; `llmshearing export`'s loader
    reads the student out of it."""
    plain, kd = str(tmp_path / "plain"), str(tmp_path / "kd")
    _run(tiny_setup, plain)
    _run(tiny_setup, kd, "distill.alpha=0", "distill.temperature=2", "distill.top_k=50")
    a, b = jsonl(os.path.join(plain, "pruning_log.jsonl")), jsonl(os.path.join(kd, "pruning_log.jsonl"))
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert {k: v for k, v in y.items() if k not in ("loss/train/kd", "loss/train/ce")} == x
        assert y["loss/train/ce"] == y["loss/train/lm"] and y["loss/train/kd"] > 0
    assert weights_log(kd) == weights_log(plain)  # per-domain eval losses: the plain LM losses of the student
    sa, sb = _state(plain), _state(kd)
    teacher = {k: v for k, v in sb["model"].items() if k.startswith("teacher.")}
    assert set(sb["model"]) - set(teacher) == set(sa["model"])
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    source = load_file(os.path.join(tiny_setup["model"], "model.safetensors"))
    for key, value in source.items():
        assert torch.equal(teacher["teacher.lm." + key], value), key
    opt = sb["optimizers"]["AdamW"]
    assert set(opt["state"]) == set(sa["optimizers"]["AdamW"]["state"])
    assert not any(k.startswith("teacher.") for k in opt["state"])
    _, model = load_checkpoint(os.path.join(kd, "ep0-ba6-rank0.pt"))
    assert model.teacher is None and torch.equal(model.model.lm_head.weight, sa["model"]["model.lm_head.weight"])


@pytest.mark.slow
def test_resume_with_a_teacher_is_bit_identical(tiny_setup, tmp_path):
    """Pruning with distillation (alpha 0.5) resumed from its batch-3 checkpoint ends on the uninterrupted run's
    weights, teacher and optimizer state, with the same log rows."""
    base, resumed = str(tmp_path / "base"), str(tmp_path / "resumed")
    kd = ["distill.alpha=0.5", "distill.temperature=2"]
    _run(tiny_setup, base, *kd)
    _run(tiny_setup, resumed, *kd, f"load_path={base}/ep0-ba3-rank0.pt")
    a, b = _state(base), _state(resumed)
    assert any(k.startswith("teacher.") for k in a["model"]) and a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["optimizers"]["AdamW"]["state"].items():
        other = b["optimizers"]["AdamW"]["state"][key]
        assert all(torch.equal(v, other[n]) if torch.is_tensor(v) else v == other[n] for n, v in value.items()), key
    assert jsonl(os.path.join(resumed, "pruning_log.jsonl")) == jsonl(os.path.join(base, "pruning_log.jsonl"))[3:]


@pytest.mark.slow
def test_continued_pretraining_with_a_teacher_logs_kd_and_ce(tiny_setup, tmp_path):
    """Continued pretraining from the tiny model with another model (same tokenizer) as teacher, alpha 0.5:
    Composer logs loss/train/kd and loss/train/ce every batch, total = their mix; the teacher stays frozen."""
    from composer.loggers import InMemoryLogger

    from llmshearing import registry
    from llmshearing.compat import close_trainer
    from llmshearing.train.builders import build_trainer
    from llmshearing.train.config import load_config
    from llmshearing.train.run_folder import unlock

    other = str(tmp_path / "teacher")
    random_model("smollm2-gqa", 384, seed=1).save_pretrained(other)
    load_tokenizer(tiny_setup["model"]).save_pretrained(other)  # the student's tokenizer: checked, accepted
    if "in_memory" not in registry.loggers.names():
        registry.loggers.register("in_memory", InMemoryLogger)
    folder = str(tmp_path / "run")
    cfg = load_config(CONTINUE_YAML, [*paths(tiny_setup, folder), "max_duration=4ba", "eval_interval=4ba",
                                      "data.proportions=null", "data.num_workers=0", "export_dir=null",
                                      f"distill.teacher={other}", "distill.alpha=0.5", "distill.temperature=2",
                                      "loggers={in_memory: {}}"])
    trainer, _ = build_trainer(cfg)
    try:
        trainer.fit()
        memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
        total, ce, kd = ([v for _, v in memory.data[f"loss/train/{k}"]] for k in ("total", "ce", "kd"))
        assert len(total) == len(ce) == len(kd) == 4 and "loss/train/lm" not in memory.data
        for t, c, k in zip(total, ce, kd):
            assert k > 0 and t == pytest.approx(0.5 * c + 0.5 * k, rel=1e-6)
        teacher = trainer.state.model.teacher
        assert not teacher.training
        source = load_file(os.path.join(other, "model.safetensors"))
        weights = teacher.lm.state_dict()
        for key, value in source.items():
            assert torch.equal(weights[key], value), key
        assert weights_log(folder)[0]["losses"]  # per-domain eval of the student ran
    finally:
        close_trainer(trainer)
        unlock(folder)


# ------------------------------------------------------------------------------------------ bad input

@pytest.fixture(scope="module")
def bad_teachers(tmp_path_factory):
    """A model with another vocab_size (no tokenizer), and one of the student's size with a different tokenizer."""
    root = tmp_path_factory.mktemp("teachers")
    random_model("smollm2-gqa", 400).save_pretrained(root / "vocab400")
    texts = [t[::-1] for docs in domain_texts().values() for t in docs]  # other text: other merges, same size
    tokenizer = train_tokenizer(texts, 384)
    assert len(tokenizer) == 384
    random_model("smollm2-gqa", 384).save_pretrained(root / "other_tokenizer")
    tokenizer.save_pretrained(root / "other_tokenizer")
    return {"vocab": str(root / "vocab400"), "tokenizer": str(root / "other_tokenizer")}


@pytest.mark.parametrize("override, names", [
    ("distill.alpha=1.5", ["distill.alpha", "[0, 1]"]),
    ("distill.alpha=-0.1", ["distill.alpha", "[0, 1]"]),
    ("distill.alpha=.nan", ["distill.alpha"]),
    ("distill.temperature=0", ["distill.temperature", "[0.1, 100]"]),
    ("distill.temperature=-2", ["distill.temperature", "[0.1, 100]"]),
    ("distill.temperature=1e-30", ["distill.temperature", "[0.1, 100]", "one-hot"]),  # total loss 0.0000
    ("distill.temperature=1000", ["distill.temperature", "[0.1, 100]", "flat"]),
    ("distill.top_k=0", ["distill.top_k"]),
    ("distill.top_k=1", ["distill.top_k", ">= 2", "KL is 0"]),  # with alpha 1: total loss 0.0000
    ("distill.top_k=100000", ["distill.top_k", "384"]),
    ("distill.teacher=/nonexistent/teacher", ["distill.teacher", "/nonexistent/teacher", "does not exist"]),
    ("distill.tempreature=2", ["distill.tempreature", "distill.temperature"]),
])
def test_bad_distill_settings_are_refused_before_training(tiny, capsys, override, names):
    before = snapshot(tiny["run"])
    refused(capsys, train(tiny, override), *names)
    assert snapshot(tiny["run"]) == before


def test_teacher_with_another_vocabulary_or_tokenizer_is_refused(tiny, bad_teachers, capsys):
    err = refused(capsys, train(tiny, f"distill.teacher={bad_teachers['vocab']}"), "distill.teacher",
                  bad_teachers["vocab"], "vocab_size 400", "has 384")
    assert tiny["model"] in err  # the student named too
    refused(capsys, train(tiny, f"distill.teacher={bad_teachers['tokenizer']}"), "distill.teacher",
            bad_teachers["tokenizer"], "different tokenizer")
    assert not os.path.exists(tiny["run"])


def test_teacher_source_without_pruning_is_refused(tiny, capsys):
    rc = train_main([CONTINUE_YAML, *paths(tiny, tiny["run"]), "data.proportions=null", "distill.alpha=0.5"])
    refused(capsys, rc, "distill.teacher=source", "no pruning section", "model.path")
    rc = train_main([CONTINUE_YAML, *paths(tiny, tiny["run"]), "data.proportions=null", "distill.alpha=0.5",
                     f"distill.teacher={tiny['model']}/"])  # the student's own folder, spelled as a path: kd = 0
    refused(capsys, rc, "no pruning section", "is model.path", "nothing would be distilled")
    rc = train_main([TINY_YAML, *paths(tiny, tiny["run"]), "distill.alpha=0.5", "fsdp={use_orig_params: false}"])
    refused(capsys, rc, "fsdp.use_orig_params")
    assert not os.path.exists(tiny["run"])


def test_a_teacher_smaller_than_the_student_is_allowed_with_a_warning(tiny, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmshearing.train.config import load_config

    config = AutoConfig.from_pretrained(tiny["model"])
    config.num_hidden_layers = 1
    small = str(tiny["tmp"] / "small_teacher")
    AutoModelForCausalLM.from_config(config).save_pretrained(small)
    load_tokenizer(tiny["model"]).save_pretrained(small)
    cfg = load_config(CONTINUE_YAML, [*paths(tiny, tiny["run"]), "data.proportions=null", f"distill.teacher={small}"])
    assert cfg.distill.teacher == small
    err = capsys.readouterr().err
    assert "fewer than the student's" in err and small in err, err
    load_config(TINY_YAML, [*paths(tiny, tiny["run"]), f"distill.teacher={tiny['model']}"])  # the source: no warning
    assert "fewer than" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- FSDP

STRUCTURE = BUILD_AND_CHAIN + """m = trainer.state.model
grouped = {id(p) for g in trainer.state.optimizers[0].param_groups for p in g["params"]}
print("STRUCTURE " + json.dumps({"teacher": chain(m.teacher), "student_layer": chain(m.model.model.layers[0]),
      "layers": [chain(x) for x in m.teacher.lm.model.layers],
      "teacher_in_optimizer": any(id(p) in grouped for p in m.teacher.parameters()),
      "teacher_frozen": not any(p.requires_grad for p in m.teacher.parameters())}))
"""


@pytest.mark.slow
def test_teacher_is_sharded_like_the_student_under_fsdp(tiny_setup, tmp_path):
    proc = run([sys.executable, "-c", STRUCTURE, FSDP_YAML, *paths(tiny_setup, str(tmp_path / "x")), "distill.alpha=0.5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("STRUCTURE "))
    s = json.loads(line[len("STRUCTURE "):])
    assert s["teacher"] == ["FullyShardedDataParallel", "Teacher"]
    assert s["student_layer"] == ["FullyShardedDataParallel", "CheckpointWrapper", "DecoderLayer"]
    assert s["layers"] == [["FullyShardedDataParallel", "DecoderLayer"]] * 4  # no checkpointing of a no_grad forward
    assert s["teacher_frozen"] and not s["teacher_in_optimizer"]


@pytest.mark.slow
def test_two_process_fsdp_distillation_equals_one_process_and_resumes(tiny_setup, tmp_path):
    """Pruning with distillation (alpha 0.5, T 2, top-50), 2 ranks under FSDP (rank 0 reads both models, FSDP
    broadcasts them) vs 1 process: the logged losses (kd and ce included), expected sizes and multipliers agree to
    1e-5 at the first step and 1e-3 after (test_fsdp's tolerance). The sharded checkpoint holds the source's
    weights as the teacher, and a 2-rank run resumed from the batch-3 one ends on the same weights and log."""
    extra = ["max_duration=6ba", "eval_interval=3ba", "save_interval=3ba", "export_dir=null", "data.num_workers=0",
             "distill.alpha=0.5", "distill.temperature=2", "distill.top_k=50", "fsdp.state_dict_type=sharded",
             "optimizer.clip_grad_norm=1.0"]  # clipping skips the teacher's FSDP root (it has no gradients)
    one, two, resumed = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "resumed")
    assert train_main([FSDP_YAML, *paths(tiny_setup, one), *extra, "fsdp=null"]) == 0
    ok(two_procs(FSDP_YAML, tiny_setup, two, *extra), two)
    with open(two + "-rank1.err") as f:
        assert "with no gradients" not in f.read()
    a, b = jsonl(os.path.join(one, "pruning_log.jsonl")), jsonl(os.path.join(two, "pruning_log.jsonl"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(6))
    assert set(a[0]) == set(b[0]) and {"loss/train/kd", "loss/train/ce", "loss/train/lm"} <= set(a[0])
    for i, (x, y) in enumerate(zip(a, b)):
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=1e-5 if i == 0 else 1e-3, abs=1e-6), (i, key)
    for x, y in zip(weights_log(one), weights_log(two), strict=True):
        assert y["losses"] == pytest.approx(x["losses"], rel=1e-4)
    final = checkpoint_state(os.path.join(two, "ep0-ba6"))["model"]
    source = load_file(os.path.join(tiny_setup["model"], "model.safetensors"))
    for key, value in source.items():
        assert torch.equal(final["teacher.lm." + key], value), key
    ok(two_procs(FSDP_YAML, tiny_setup, resumed, *extra, f"load_path={two}/ep0-ba3"), resumed)
    again = checkpoint_state(os.path.join(resumed, "ep0-ba6"))["model"]
    assert final.keys() == again.keys()
    for key, value in final.items():
        assert torch.equal(value, again[key]), key
    assert jsonl(os.path.join(resumed, "pruning_log.jsonl")) == b[3:]


def test_quick_benchmark_runs(tmp_path):
    """bench.distill --quick end to end: every variant timed, a ratio for each distilled one (no timing assertion)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.distill import main

    out, threads = tmp_path / "d.json", torch.get_num_threads()
    try:
        assert main(["--quick", "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # --quick sets 1 thread for the process
    r = json.loads(out.read_text())
    assert set(r["steps"]) == {f"{s}/{v}" for s in ("prune", "continue") for v in ("plain", "kd", "kd_top64")}
    assert set(r["ratios"]) == {f"{s}/{v}" for s in ("prune", "continue") for v in ("kd", "kd_top64")}
    assert all(x["of_medians"] > 0 for x in r["ratios"].values())
