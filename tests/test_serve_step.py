"""The serving engine's own decode step (``serve.step``) against the model's forward: the same logits for routed
rows of several adapters and the base, in every weight mode and for each architecture it covers; one copy of the
fused weights; the models and adapters it declines, and why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.precision import decide
from lorakit.serve.engine import Engine, Request, SamplingParams
from lorakit.serve.step import DecodeStep
from lorakit.weights import quantize_int8

from .conftest import randomize_adapters

PROMPTS = [[5, 9, 2, 7, 11, 3], [4, 8], [6, 1, 12, 10], [13, 2, 9]]  # left-padded to different lengths
ROWS = ["a", None, "b", "a"]


def _tiny(family: str, **extra) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
                    initializer_range=0.2)  # fmt: skip
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**settings, **extra})
    return AutoModelForCausalLM.from_config(config).eval()


def _with_adapters(model: nn.Module, targets_b="all-linear") -> nn.Module:
    """Adapter a (rank 4, every linear) and b (rank 2, ``targets_b``), both with random A and B."""
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=targets_b), "b")
    randomize_adapters(model, seed=1, scale=0.3)
    return model


class _Tokenizer:
    pad_token_id = 0
    eos_token_id = 1
    chat_template = None

    def decode(self, ids, **kwargs):
        return " ".join(map(str, ids))

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]


def _compare(model: nn.Module, precision=None, steps: int = 5, rows=ROWS, prompts=PROMPTS, tie=0.0) -> list[float]:
    """Prefill ``prompts`` on ``rows``' adapters, then decode ``steps`` tokens; at every step the engine's own
    step and the model's forward see the same cache. Returns the largest logit difference of each step and
    asserts both chose the same tokens (up to near-ties within ``tie``)."""
    engine = Engine(model, _Tokenizer(), max_batch_size=8, precision=precision, fast_step=True)
    for ids, adapter in zip(prompts, rows, strict=True):
        engine.submit(Request(ids, adapter, SamplingParams(max_tokens=100, ignore_eos=True), lambda e: None))
    differences = []
    autocast = precision.autocast if precision is not None else None
    with torch.inference_mode():
        engine._prefill(engine._admit())
        step = engine.decode_step()
        assert step is not None, engine.decode_path
        for _ in range(steps):
            running = engine._running
            ids = torch.tensor([r.generated[-1] for r in running])
            positions = torch.tensor([len(r.prompt_ids) + r.sampled - 1 for r in running])
            adapters = [r.adapter for r in running]
            cache = engine._kv.step_cache()
            expected = engine._forward(ids[:, None], engine._kv.attention_mask(extra=1), positions[:, None], cache,
                                       adapters)  # fmt: skip
            engine._kv.prepare_step()
            got = step(ids, positions, engine._kv, adapters, autocast)
            engine._kv.advance()
            assert got.dtype == torch.float32 and got.shape == expected.shape
            # the step's choice is the model's, or (bf16) a token the model scores within ``tie`` of its best
            chosen = expected.gather(1, got.argmax(-1, keepdim=True)).squeeze(1)
            assert bool((expected.max(-1).values - chosen <= tie).all())
            differences.append(float((got - expected).abs().max()))
            engine._emit_tokens(running, got)
    return differences


LAYOUTS = {  # rows' adapters: each of the step's three ways to apply them
    "per-row": ROWS,  # as many adapters as half the rows: every row its own A and B (batched products)
    "masked": ["a", None, "a", "b", "a"],  # few adapters for the rows: one product over both, rows masked
    "one adapter": ["b", "b", "b"],  # every row on one adapter: no mask
    "one row": ["a"],  # one stream: sdpa's kernel for attention (several rows: two products and a softmax)
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_the_step_gives_the_models_logits_for_routed_rows_in_float32(family, layout):
    """Rows on adapter a, the base and adapter b (on q/v only), prompts of several lengths, in each of the
    step's ways to apply adapters: float32 logits equal to the model's forward to rounding, for each covered
    architecture (qwen2: q/k/v biases)."""
    from lorakit.serve import step as step_module

    model = _with_adapters(_tiny(family), targets_b=["q_proj", "v_proj"])
    rows = LAYOUTS[layout]
    assert step_module._Route(rows, None, torch.device("cpu")).per_row == (layout == "per-row")
    differences = _compare(model, rows=rows, prompts=(PROMPTS * 2)[: len(rows)])
    assert max(differences) < 1e-4, differences


@pytest.mark.parametrize("layout", ["per-row", "masked", "one row"])
@pytest.mark.parametrize(("precision_name", "weights"), [("bf16-mixed", "precision"), ("bf16-mixed", "int8"),
                                                         ("bf16", "precision")])  # fmt: skip
def test_the_step_under_bf16_is_the_models_bf16_forward_to_rounding(precision_name, weights, layout):
    """bf16-mixed (bf16 base, float32 adapters, lorakit's attention as ``lorakit serve`` loads it), bf16-mixed
    over int8 weights, and pure bf16 (bf16 adapters too, no autocast): the step's logits are the model's own bf16
    forward's to bf16 rounding (the largest difference a few bf16 steps on logits of order 5; a missing adapter
    moves them by 4), with one row, rows on different adapters and rows masked to theirs."""
    from lorakit.attention import use_lorakit_attention

    precision = decide(precision_name, "cpu")
    model = _with_adapters(_tiny("llama"))
    model.to(torch.bfloat16)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(precision.trained)
    use_lorakit_attention(model)
    if weights == "int8":
        quantize_int8(model)
    rows = LAYOUTS[layout]
    differences = _compare(model, precision=precision, steps=4, tie=0.25, rows=rows, prompts=(PROMPTS * 2)[: len(rows)])
    assert max(differences) < 0.25, differences


def test_fused_weights_are_views_of_one_copy_and_the_models_forward_is_unchanged():
    """Building the step concatenates q/k/v and gate/up weights and re-points each layer's weight to its rows
    (no second copy); the model's forward gives the same logits after; a rebuild reuses the same tensors."""
    model = _with_adapters(_tiny("llama"))
    quantize_int8(model)
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        before = model(ids).logits
    step, why = DecodeStep.build(model)
    assert step is not None and "llama" in why
    group = step.layers[0].qkv
    q = model.model.layers[0].self_attn.q_proj.base_layer
    k = model.model.layers[0].self_attn.k_proj.base_layer
    assert q.weight.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
    assert k.weight.data_ptr() == group.weight.data_ptr() + q.weight.numel() * q.weight.element_size()
    assert k.scale.untyped_storage().data_ptr() == group.scale.untyped_storage().data_ptr()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)
    again, _ = DecodeStep.build(model)
    assert (
        again.layers[0].qkv.weight is group.weight and again.layers[1].gate_up.weight is step.layers[1].gate_up.weight
    )


def test_the_step_keeps_the_stacks_of_the_last_two_sets_of_adapters_only():
    """A server's sets of routed adapters keep changing; each group keeps its stacked tensors for the last two."""
    model = _with_adapters(_tiny("llama"))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear"), "c")
    step, _ = DecodeStep.build(model)
    engine = Engine(model, _Tokenizer(), fast_step=True)
    for ids in PROMPTS:
        engine.submit(Request(ids, None, SamplingParams(max_tokens=50, ignore_eos=True), lambda e: None))
    with torch.inference_mode():
        engine._prefill(engine._admit())
        for rows in (["a"] * 4, ["b"] * 4, ["c"] * 4, ["a", "b", None, None], ["b", "c", None, None], ["c", "a"] * 2):
            engine._kv.prepare_step()
            ids = torch.tensor([r.generated[-1] for r in engine._running])
            positions = torch.tensor([len(r.prompt_ids) + r.sampled - 1 for r in engine._running])
            step(ids, positions, engine._kv, rows, None)
    assert all(len(group._stacks) <= 2 and len(group._row_stacks) <= 2 for group in step.groups())
    assert len(step.layers[0].qkv._stacks) == 2 and len(step.layers[0].qkv._row_stacks) == 2


def test_an_adapter_loaded_after_the_step_was_built_is_routed():
    """After ``invalidate_adapters`` (what the server's adapter load does) the step is rebuilt with the new
    adapter's layers, and its rows get that adapter's logits."""
    model = _with_adapters(_tiny("llama"))
    engine = Engine(model, _Tokenizer(), fast_step=True)
    assert engine.decode_step() is not None
    lorakit.inject(model, lorakit.LoraConfig(r=3, target_modules=["o_proj", "down_proj"], init="random"), "c")
    randomize_adapters(model, seed=5, scale=0.3)
    engine.invalidate_adapters()
    assert max(_compare(model, rows=["c", "a", None, "c"])) < 1e-4


def test_a_cache_longer_than_the_sliding_window_goes_to_the_models_forward():
    """Mistral with a 4-token window: the step declines (None) once the cache is longer, and the engine's
    tokens are still the model's (its forward applies the window)."""
    model = _with_adapters(_tiny("mistral", sliding_window=4))
    step, _ = DecodeStep.build(model)
    engine = Engine(model, _Tokenizer(), fast_step=True)
    for ids, adapter in zip(PROMPTS, ROWS, strict=True):
        engine.submit(Request(ids, adapter, SamplingParams(max_tokens=10, ignore_eos=True), lambda e: None))
    with torch.inference_mode():
        engine._prefill(engine._admit())
        engine._kv.prepare_step()
        running = engine._running
        ids = torch.tensor([r.generated[-1] for r in running])
        positions = torch.tensor([len(r.prompt_ids) + r.sampled - 1 for r in running])
        assert step(ids, positions, engine._kv, [r.adapter for r in running], None) is None


def _modules_to_save(model):
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "c")


def _dora(model):
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "c")


def _mixed_dtypes(model):
    model.model.layers[0].self_attn.k_proj.base_layer.to(torch.float64)


def _on_embeddings(model):
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens"]), "c")


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda m: None, None),
        (_modules_to_save, "modules_to_save"),
        (_dora, "DoRA"),
        (lambda m: lorakit.merge(m, "a"), "merged"),
        (_on_embeddings, "embed_tokens"),
        (_mixed_dtypes, "different kinds, dtypes"),
    ],
)
def test_the_engine_says_why_it_decodes_with_the_models_forward(change, reason):
    model = _with_adapters(_tiny("llama"))
    change(model)
    engine = Engine(model, _Tokenizer())
    step = engine.decode_step()
    if reason is None:
        assert step is not None and engine.decode_path.startswith("lorakit's decode step")
    else:
        assert step is None and reason in engine.decode_path and "model's forward" in engine.decode_path
    assert Engine(model, _Tokenizer(), fast_step=False).decode_step() is None


def test_other_architectures_decode_with_the_models_forward():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    engine = Engine(model, _Tokenizer())
    assert engine.decode_step() is None and "model type 'gpt2'" in engine.decode_path


def test_off_a_cpu_the_step_is_built_only_when_asked_for():
    """The default (None) builds the step on a CPU only; a model on another device (here the meta device, as a
    GPU would be) decodes with its forward unless the engine asks for the step (True), and False never builds it."""
    with torch.device("meta"):
        model = _tiny("llama")
    step, why = DecodeStep.build(model)
    assert step is None and "on CPUs only, not meta" in why
    step, why = DecodeStep.build(model, True)
    assert step is not None and why.startswith("lorakit's decode step for llama")
    step, why = DecodeStep.build(_tiny("llama"), False)
    assert step is None and "fast_step=False" in why
