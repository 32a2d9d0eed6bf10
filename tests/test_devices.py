"""The second-device tier (`make test-devices`, docs/devices.md): the code paths of the paper recipes at their real
shapes on torch's meta device, with no GPU and no weights. The model is built where Composer would have moved it
(meta stands in for CUDA), the masks on the CPU and moved as the builders do; inputs are on the model's device as
Composer's batch_to_device leaves them. Any tensor the code creates without a device lands on the CPU and fails
against the meta ones, as it would against CUDA ones on the first batch of a GPU run.
"""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from composer.core import State
from composer.devices import DeviceCPU
from composer.loggers import Logger

from llmshearing.callbacks import ClipGradNorm, PruningLog, StopOnNonFinite
from llmshearing.data.reweighting import RULES, update_weights
from llmshearing.fake_device import META, meta_values, to_meta
from llmshearing.train.composer_model import ComposerLM
from llmshearing.model.decoder import DecoderLM
from llmshearing.model.distill import Teacher
from llmshearing.pruning.export import finalize, kept_units
from llmshearing.pruning import oneshot
from llmshearing.pruning.masks import L0Module
from llmshearing.pruning.shapes import SHAPE_KEYS, Shape, param_count, shape_of, target_config
from llmshearing.pruning.target import resolve_target
from llmshearing.train.mask_init import init_masks
from llmshearing.train.plan import load_model_config, read_recipe, resolve_model, resolve_seq_len, resolve_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA31_8B = os.path.join(REPO, "yamls", "models", "llama-3.1-8b.json")
QWEN3_8B = os.path.join(REPO, "yamls", "models", "qwen3-8b.json")
LLAMA32_3B = Shape(28, 3072, 24, 8, 8192)  # Llama-3.2-3B's layers / hidden / heads / KV heads / intermediate
DTYPES = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16, "fp32": torch.float32}
# pruning.init=activation scores 4 sequences per domain (pruning.init_sequences), 28 of RedPajama's 7 domains, in
# passes of one 4096-token sequence (oneshot.SCORE_PASS_TOKENS); every pass runs the same code, so 2 passes show it
CALIBRATION_SEQUENCES = 2


def meta_lm(config, dtype=torch.float32) -> DecoderLM:
    """A DecoderLM on the meta device in `dtype` (FSDP's mixed precision computes in the run's half precision)."""
    with torch.device(META):
        return DecoderLM(config, "sdpa").to(dtype)


def recipe_case(name: str, distill: bool = False, init: bool = False) -> dict:
    """What a paper recipe trains, resolved as `llmshearing plan` does (no weights, no paths): the model config,
    the source config and target when pruning, the teacher config with `distill`, microbatch x seq_len."""
    recipe = read_recipe(name)
    if distill:  # as the recipes' comments say: the pruning source, or Llama-2-7B for continued pretraining
        recipe = {**recipe, "distill": {"teacher": "source"} if recipe["pruning"] else
                  {"teacher": "models/Llama-2-7b-hf"}, "distill_teacher_raw": "${oc.env:LLAMA2_7B}"}
    config, _, _ = resolve_model(recipe)
    teacher = resolve_teacher(recipe, config)
    seq, _ = resolve_seq_len(recipe, config, None)
    target = resolve_target(recipe["pruning_target"], config) if recipe["pruning"] else None
    return {"config": config, "target": target, "teacher": teacher and teacher[0], "init": init,
            "batch": recipe["device_train_microbatch_size"], "seq": seq, "dtype": DTYPES[recipe["precision"]]}


def llama3_case(distill: bool = False, init: bool = False) -> dict:
    config = load_model_config(LLAMA31_8B)
    return {"config": config, "target": LLAMA32_3B, "teacher": config if distill else None, "init": init,
            "batch": 2, "seq": 4096, "dtype": torch.bfloat16}


def llama3_recipe_case(name: str, distill: bool = False, init: bool = False, source: str = LLAMA31_8B) -> dict:
    """A Llama-3 (or Qwen3) recipe (yamls/*llama3*, *qwen3*) resolved as `llmshearing plan NAME --model-config
    yamls/models/<source>.json [--target-shape PRESET]` does: the pruning source, or its pruned export."""
    recipe = read_recipe(name)
    preset = None if recipe["pruning"] else read_recipe(name.replace("continue", "prune"))["pruning_target"]
    if distill:  # as the recipes' comments say: the pruning source, or the source model for continued pretraining
        recipe = {**recipe, "distill": {"teacher": "source" if recipe["pruning"] else source}}
    config, _, _ = resolve_model(recipe, source, preset)
    teacher = resolve_teacher(recipe, config, None if recipe["pruning"] or not distill else source)
    target = resolve_target(recipe["pruning_target"], config) if recipe["pruning"] else None
    return {"config": config, "target": target, "teacher": teacher and teacher[0], "init": init,
            "batch": recipe["device_train_microbatch_size"], "seq": 4096, "dtype": DTYPES[recipe["precision"]]}


CASES = {
    "prune_1.3b": lambda: recipe_case("prune_1.3b"),
    "prune_1.3b+distill+init": lambda: recipe_case("prune_1.3b", distill=True, init=True),
    "prune_2.7b": lambda: recipe_case("prune_2.7b"),  # no layer mask (32 layers kept)
    "continue_1.3b+distill": lambda: recipe_case("continue_1.3b", distill=True),
    "continue_2.7b": lambda: recipe_case("continue_2.7b"),
    "llama3.1-8b->3.2-3b": lambda: llama3_case(),
    "llama3.1-8b->3.2-3b+distill+init": lambda: llama3_case(distill=True, init=True),
    # the shipped Llama-3 recipes (prune_llama3_3b's shape, microbatch and dtype are llama3_case's)
    "prune_llama3_1b+distill+init": lambda: llama3_recipe_case("prune_llama3_1b", distill=True, init=True),
    "continue_llama3_3b+distill": lambda: llama3_recipe_case("continue_llama3_3b", distill=True),
    "continue_llama3_1b": lambda: llama3_recipe_case("continue_llama3_1b"),
    # the Qwen3-8B -> qwen3-1.7b pruning recipe: q_norm / k_norm, untied 152k-entry head (its continue recipe is a
    # dense Qwen3 of that shape, as continue_llama3_*: not repeated here, to keep the tier's time)
    "prune_qwen3_1.7b+distill+init": lambda: llama3_recipe_case("prune_qwen3_1.7b", True, True, QWEN3_8B),
}


def composer_state(model) -> tuple[State, Logger]:
    """A real Composer State around `model` (on the CPU device object: the callbacks read only the model, the loss
    and the precision), and a Logger with no destinations."""
    state = State(model=model, rank_zero_seed=0, run_name="meta", device=DeviceCPU())
    return state, Logger(state, destinations=[])


def build(case: dict, l0_class=L0Module) -> ComposerLM:
    """The ComposerLM of a case on meta: the student (in the run's compute dtype), the masks (built on the CPU as
    builders.build_model does, moved as Composer moves them), the frozen teacher."""
    lm = meta_lm(case["config"], case["dtype"])
    l0 = None
    if case["target"] is not None:
        l0 = to_meta(l0_class(shape_of(case["config"]), case["target"], warmup_steps=640, seed=17))
    teacher = Teacher(meta_lm(case["teacher"], case["dtype"])) if case["teacher"] is not None else None
    return ComposerLM(lm, l0, teacher)


def batch(case: dict) -> dict:
    ids = torch.empty(case["batch"], case["seq"], dtype=torch.long, device=META)
    return {"input_ids": ids, "labels": ids, "batch_index": torch.empty(case["batch"], dtype=torch.long, device=META)}


@pytest.mark.parametrize("name", list(CASES))
def test_recipe_runs_on_a_second_device(name, monkeypatch, tmp_path):
    """Build, pruning.init=activation (mask_init.init_masks: scoring, log_alpha bands), a masked training step with the loss (distillation included) and its backward,
    gradient clipping and the non-finite check, every PruningLog value, eval forward with test-time masks and its
    metric, the mixing rule on that metric, and export's keep-and-slice, all on meta at the recipe's shapes."""
    case = CASES[name]()
    model = build(case)
    config, l0 = case["config"], model.l0
    with meta_values():
        if case["init"]:  # pruning.init=activation (mask_init.init_masks): scoring, then the log_alpha bands
            ids = torch.empty(CALIBRATION_SEQUENCES, case["seq"], dtype=torch.long, device=META)
            monkeypatch.setattr(oneshot, "calibration_ids", lambda *args, **kwargs: ids)  # the shards' sequences
            cfg = SimpleNamespace(pruning=SimpleNamespace(init="activation", init_sequences=4, log_alpha_clamp=None,
                                                  init_at_target=False),
                                  data=SimpleNamespace(root=None, domains=["d"], split="prune", remote=None),
                                  load_path=None, autoresume=False, save_folder=None)
            record = init_masks(cfg, model, str(tmp_path), "cpu")  # device "cpu": score where the model is
            assert record["calibration_tokens"] == ids.numel() and set(record["expected_shape_step0"]) == set(SHAPE_KEYS)

        model.train()
        data = batch(case)
        outputs = model(data)
        assert outputs.shape == (case["batch"], case["seq"], config.vocab_size) and outputs.is_meta
        loss = model.loss(outputs, data)
        total = loss["total"] if isinstance(loss, dict) else loss
        if case["teacher"] is not None:
            assert loss["kd"].is_meta and loss["kd"].dim() == 0
        total.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and g.is_meta for g in grads)
        if l0 is not None:
            assert all(m.log_alpha.grad is not None for m in l0.masks.values()) and l0.lambdas.grad is not None
        assert all(p.grad is None for p in (model.teacher.parameters() if model.teacher else ()))

        state, logger = composer_state(model)
        state.loss = loss
        StopOnNonFinite(None).after_backward(state, logger)
        ClipGradNorm(1.0).after_train_batch(state, logger)
        if l0 is not None:
            logged = {}
            logger.log_metrics = logged.update
            PruningLog(folder=None).batch_end(state, logger)
            names = [f"l0/{n}/{k}" for n in l0.masks for k in ("expected_sparsity", "target_sparsity",
                                                               "lambda_1", "lambda_2")]
            assert set(logged) == {*names, *(f"expected/{k}" for k in l0.expected_shape()), "expected/params"}
            assert all(isinstance(v, (int, float)) for v in logged.values())

        model.eval()
        eval_out = model.eval_forward(data)
        metric = model.get_metrics()["LanguageCrossEntropy"].to(META)
        model.update_metric(data, eval_out, metric)
        losses = np.full(7, float(metric.compute()))  # DynamicLoading.eval_after_all: one eval loss per domain
        weights, _ = update_weights(np.full(7, 1 / 7), losses, np.zeros(7), 1.0, 1e-4, RULES["paper"])
        assert weights.sum() == pytest.approx(1)

        if l0 is not None:
            model.model.float()  # export folds the fp32 training weights
            pruned, kept = finalize(model.model, l0)
            want = target_config(config, case["target"])
            assert {k: v.shape for k, v in pruned.state_dict().items()} == \
                   {k: v.shape for k, v in meta_lm(want).state_dict().items()}
            assert all(p.is_meta for p in pruned.parameters())
            assert len(kept["layers"]) == case["target"].num_hidden_layers
            assert param_count(case["target"], config) == sum(p.numel() for p in pruned.parameters())


class _OldExpectedShape(L0Module):
    """L0Module with expected_shape as it was before issue 23: the ones standing in for a missing head or kv_head
    mask were made without a device."""

    @torch.no_grad()
    def expected_shape(self) -> dict[str, float]:
        score = {n: m.score() for n, m in self.masks.items()}
        src = self.source
        kv_score = score.get("kv_head", torch.ones(src.num_hidden_layers, src.num_key_value_heads))
        q_score = score.get("head", torch.ones(*kv_score.shape, src.heads_per_group))
        return {"num_attention_heads": float((kv_score.unsqueeze(-1) * q_score).sum((1, 2)).mean())}


@pytest.mark.parametrize("name", ["prune_1.3b", "llama3.1-8b->3.2-3b"])
def test_the_tier_fails_on_a_tensor_made_without_a_device(name):
    """The bug the tier was made for: sheared-llama (kv_head mask, no head mask) and Llama-3 -> 3.2-3B (head mask,
    no kv_head mask) crashed PruningLog at the first batch on a GPU; on meta they fail the same way."""
    case = CASES[name]()
    model = build(case, _OldExpectedShape)
    assert ("kv_head" in model.l0.masks) != ("head" in model.l0.masks)
    state, logger = composer_state(model)
    with meta_values(), pytest.raises(RuntimeError, match="device"):
        PruningLog(folder=None).batch_end(state, logger)
    with meta_values():
        L0Module.expected_shape(model.l0)  # the fixed code, on the same masks


def test_meta_refuses_what_cuda_refuses():
    """The checks meta kernels skip and CUDA makes: a CPU index for index_select, a CPU operand beside a device
    one; what CUDA accepts passes (indexing with CPU indices, copies, 0-dim CPU scalars)."""
    x = torch.ones(4, 3, device=META)
    with meta_values():
        with pytest.raises(RuntimeError, match="CPU tensor"):
            x.index_select(0, torch.arange(2))
        with pytest.raises(RuntimeError, match="CPU tensor"):
            torch.cat([x, torch.ones(1, 3)])
        assert x[torch.arange(2)].shape == (2, 3) and (x * torch.tensor(2.0)).is_meta
        x[torch.arange(2)] = torch.zeros(2, 3, device=META)  # CPU indices, device values: CUDA accepts
        with pytest.raises(RuntimeError, match="CPU tensor"):
            x[torch.arange(2, device=META)] = torch.zeros(2, 3)  # CPU values among device tensors
        assert x.index_select(0, torch.arange(2, device=META)).shape == (2, 3)
        assert float(x.sum()) == 0.5 and x.new_ones(2, dtype=torch.long).tolist() == [0, 1]


def test_mask_noise_on_meta_and_cpu():
    """The mask noise draws from a generator on the masks' device; on meta a CPU one stands in (meta has none),
    so the same code runs there; on the CPU the draws are unchanged (same seed, same device)."""
    from llmshearing.pruning.masks import seeded_generator

    l0 = L0Module(Shape(4, 8, 4, 2, 16), Shape(2, 4, 2, 1, 8), seed=3)
    l0.train()
    first = l0(2, step=5)
    l0._drawn = (-1, 0)
    again = l0(2, step=5)
    torch.testing.assert_close(first.intermediate, again.intermediate, rtol=0, atol=0)
    want = torch.rand(l0.masks["intermediate"].shape, generator=torch.Generator().manual_seed(99))
    torch.testing.assert_close(torch.rand(want.shape, generator=seeded_generator(99, torch.device("cpu"))), want,
                               rtol=0, atol=0)
    meta = to_meta(L0Module(Shape(4, 8, 4, 2, 16), Shape(2, 4, 2, 1, 8), seed=3)).train()
    with meta_values():
        assert meta(2, step=5).intermediate.is_meta


@torch.no_grad()
def _scores_before_issue_23(lm, input_ids):
    """activation_scores as it was: every sequence at once, one (B, T, H, d) per-head tensor per layer (56 GiB at
    Llama-2-7B x 28 x 4096 tokens)."""
    src = shape_of(lm.config)
    KV, R, H = src.num_key_value_heads, src.heads_per_group, src.num_attention_heads
    seen, hooks = {"act": [], "head": [], "resid": []}, []
    for block in lm.model.layers:
        def mlp_hook(mod, args):
            seen["act"].append(args[0].abs().float().mean((0, 1)) * mod.weight.float().norm(dim=0))

        def head_hook(mod, args):
            x = args[0].float()
            w = mod.weight.float().reshape(mod.weight.shape[0], H, -1)
            out = torch.einsum("bthk,dhk->bthd", x.reshape(*x.shape[:2], H, -1), w)
            seen["head"].append(out.norm(dim=-1).mean((0, 1)))

        def resid_hook(mod, args):
            seen["resid"].append(args[0].abs().float().mean((0, 1)))

        hooks += [block.mlp.down_proj.register_forward_pre_hook(mlp_hook),
                  block.self_attn.o_proj.register_forward_pre_hook(head_hook),
                  block.register_forward_pre_hook(resid_hook)]
    x = lm.model.embed_tokens(input_ids)
    cos, sin = lm.rope(input_ids.shape[1], x.dtype, x.device)
    layer = []
    for block in lm.model.layers:
        y = block(x, cos, sin)
        layer.append(1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).mean())
        x = y
    for h in hooks:
        h.remove()
    head = torch.stack(seen["head"]).reshape(-1, KV, R)
    return {"layer": torch.stack(layer), "hidden": torch.stack(seen["resid"]).mean(0), "kv_head": head.sum(-1),
            "head": head, "intermediate": torch.stack(seen["act"])}


@pytest.mark.parametrize("family", ["smollm2-gqa", "mistral"])
def test_activation_scores_in_bounded_passes_equal_the_one_pass_scores(family, monkeypatch):
    """Scoring a few sequences per pass and a few tokens per head chunk (uneven last ones) gives the scores of the
    all-at-once computation, to fp32 rounding; the peak it is planned with counts the weights and one pass."""
    from llmshearing.experiments.tiny import random_model
    from llmshearing.pruning.oneshot import activation_peak_bytes, sequences_per_pass

    hf = random_model(family)
    lm = DecoderLM(hf.config, "sdpa")
    lm.load_state_dict(hf.state_dict())
    lm.eval()
    ids = torch.randint(0, hf.config.vocab_size, (7, 40), generator=torch.Generator().manual_seed(0))
    want = _scores_before_issue_23(lm, ids)
    monkeypatch.setattr(oneshot, "SCORE_PASS_TOKENS", 80)  # 2 sequences per pass: 4 passes, the last of one
    monkeypatch.setattr(oneshot, "HEAD_CHUNK_ELEMENTS", 7 * hf.config.num_attention_heads * hf.config.hidden_size)
    assert sequences_per_pass(40) == 2
    got = oneshot.activation_scores(lm, ids)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    config = load_model_config(os.path.join(REPO, "yamls", "models", "llama-2-7b.json"))
    monkeypatch.undo()
    weights = param_count(shape_of(config), config) * 4
    # Llama-2-7B x 4096 tokens: one sequence per pass, the MLP phase the larger: 836 MiB beside 25.1 GiB of weights
    assert activation_peak_bytes(config, 4096) - weights == 4 * 4096 * (3 * 11008 + 5 * 4096) == 836 * 2**20


@pytest.mark.parametrize("family", ["llama-mha", "smollm2-gqa", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3",
                                    "pythia"])
def test_every_family_trains_evaluates_and_exports_on_meta(family):
    """The family-specific paths at tiny shapes: tied embeddings (the export's final-norm fold), q/k/v biases (the
    masked linear's bias gradient), GQA, Mistral's sliding-window mask (T = 40 > window 24), Gemma's post-norm gates,
    soft-capped eager attention and two RoPE bases."""
    from llmshearing.experiments.tiny import tiny_config

    config = tiny_config(family)
    src = shape_of(config)
    target = Shape(2, 32, src.num_key_value_heads, src.num_key_value_heads, 48)  # every level masked but KV/MHA
    case = {"config": config, "target": target, "teacher": config, "dtype": torch.float32, "batch": 2, "seq": 40}
    model = build(case)
    with meta_values():
        model.train()
        data = batch(case)
        model.loss(model(data), data)["total"].backward()
        model.eval()
        assert model.eval_forward(data).shape == (2, 40, config.vocab_size)
        pruned, _ = finalize(model.model, model.l0)
        assert {k: v.shape for k, v in pruned.state_dict().items()} == \
               {k: v.shape for k, v in meta_lm(target_config(config, target)).state_dict().items()}


def test_eval_losses_on_meta(tiny_setup):
    """`llmshearing eval`'s loss path (domain_loss_stats with evaluate_models' logits function) on meta at the
    sheared-llama-1.3b export's shape: shard ids read on the CPU meet the model's device only as evaluate_models
    moves them, the targets as domain_loss_stats moves them. (The transformers model that `llmshearing eval` loads
    does not run on meta: its rotary embedding opens an autocast region for the tensors' device type, which meta is
    not; the DecoderLM computes the same logits.)"""
    from llmshearing.eval.evaluate import domain_loss_stats

    model = meta_lm(recipe_case("continue_1.3b")["config"], torch.bfloat16).eval()
    with meta_values():
        stats = domain_loss_stats(lambda ids: model(ids.to(META)), tiny_setup["shards"], batch_size=4)
    assert set(stats) == {"prose", "code"} and all(s["loss"] == 0.5 / s["tokens"] for s in stats.values())
