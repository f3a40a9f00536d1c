"""lorakit's sdpa attention (``lorakit.attention``): bf16 matrix products (``MatmulAttention``) or float32 for short
bf16 sequences on CPUs without AMX, decided from forced CPU flags and the LORAKIT_CPU_ATTENTION override on any
machine, installed by ``fuse_forwards`` and taken away by ``unfuse_forwards`` / ``unload``, and otherwise
transformers' function exactly."""

import json

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations import sdpa_attention

import lorakit
from lorakit import attention
from lorakit.layers import fuse_forwards, unfuse_forwards

from .conftest import randomize_adapters

BF16 = torch.bfloat16
AVX512_BF16 = frozenset({"avx512f", "avx512_bf16"})
AMX = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})


@pytest.fixture
def choice(monkeypatch):
    """Set LORAKIT_CPU_ATTENTION (None: unset) and forget the cached decision around the test."""

    def set_choice(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("LORAKIT_CPU_ATTENTION", raising=False)
        else:
            monkeypatch.setenv("LORAKIT_CPU_ATTENTION", value)
        attention._cpu_choice.cache_clear()

    yield set_choice
    attention._cpu_choice.cache_clear()


@pytest.mark.parametrize(
    ("env", "flags", "expected"),
    [
        (None, AVX512_BF16, "matmul"),
        (None, frozenset({"avx2"}), "matmul"),
        (None, AMX, "bf16"),
        ("fp32", AMX, "fp32"),
        ("matmul", AMX, "matmul"),
        ("bf16", AVX512_BF16, "bf16"),
        ("auto", AVX512_BF16, "matmul"),
    ],
)
def test_the_cpu_attention_mode_follows_the_flags_and_the_override(choice, env, flags, expected):
    choice(env)
    assert attention.cpu_attention_mode(flags=flags) == expected


def test_a_bad_override_is_named_with_the_choices(choice):
    choice("half")
    with pytest.raises(ValueError, match="LORAKIT_CPU_ATTENTION='half' is not one of auto, matmul, fp32, bf16"):
        attention.cpu_attention_mode(flags=AVX512_BF16)


def _qkv(keys: int, dtype=BF16, queries: int | None = None, batch: int = 2, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(0)
    shapes = [(batch, 4, queries or keys, 16), (batch, 2, keys, 16), (batch, 2, keys, 16)]
    return [torch.randn(shape, generator=gen).to(dtype).requires_grad_(requires_grad) for shape in shapes]


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2
    training = False


def _spy(monkeypatch) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    real = sdpa_attention.sdpa_attention_forward

    def spy(module, query, *args, **kwargs):
        seen.append(query.dtype)
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    return seen


@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_short_bf16_attention_computes_in_float32_or_bf16_when_chosen(choice, monkeypatch, forced):
    choice(forced)
    seen = _spy(monkeypatch)
    q, k, v = _qkv(12)
    with torch.autocast("cpu", dtype=BF16):
        out, _ = attention.lorakit_sdpa(_Module(), q, k, v, None)
    assert out.dtype == BF16
    if forced == "fp32":
        assert seen == [torch.float32]
        expected, _ = sdpa_attention.sdpa_attention_forward(_Module(), q.float(), k.float(), v.float(), None)
        assert torch.equal(out, expected.to(BF16))  # float32 maths, rounded once at the end
    else:
        assert seen == [BF16]


def test_long_and_float32_attention_pass_straight_through(choice, monkeypatch):
    choice("fp32")
    seen = _spy(monkeypatch)
    attention.lorakit_sdpa(_Module(), *_qkv(attention.FLOAT32_BELOW), None)
    attention.lorakit_sdpa(_Module(), *_qkv(12, torch.float32), None)
    choice("matmul")
    attention.lorakit_sdpa(_Module(), *_qkv(attention.MATMUL_BELOW), None)
    attention.lorakit_sdpa(_Module(), *_qkv(12, torch.float32), None)
    assert seen == [BF16, torch.float32, BF16, torch.float32]


def _reference(module, q, k, v, mask, **kwargs):
    """transformers' sdpa in float32 on float32 copies: the maths the bf16 products must follow."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    mask = mask.float() if mask is not None and mask.dtype != torch.bool else mask
    out, _ = sdpa_attention.sdpa_attention_forward(module, q, k, v, mask, **kwargs)
    return out, (q, k, v)


def _padded_mask(queries: int, keys: int, kind: str) -> torch.Tensor:
    """A causal mask over 2 rows whose first has 3 left pads, bool (True = attend) or additive float."""
    causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    mask = causal.expand(2, 1, queries, keys).clone()
    mask[0, :, :, :3] = False
    if kind == "bool":
        return mask
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


@pytest.mark.parametrize(
    ("case", "queries", "keys"),
    [("causal", 24, 24), ("bool", 24, 24), ("float", 24, 24), ("decode", 1, 24), ("prefill-static", 24, 40),
     ("chunk", 8, 24), ("bidirectional", 24, 24)],
)  # fmt: skip
def test_the_bf16_products_follow_float32_attention_forward_and_backward(choice, monkeypatch, case, queries, keys):
    """MatmulAttention, through lorakit_sdpa, against transformers' float32 attention: outputs and the gradients of
    queries, keys and values to bf16 rounding, for every mask transformers hands it; and it is the path taken."""
    choice("matmul")
    seen = _spy(monkeypatch)
    module = _Module()
    q, k, v = _qkv(keys, queries=queries, requires_grad=True)
    mask = None
    if case in ("bool", "float"):
        mask = _padded_mask(queries, keys, case)
    elif case == "chunk":
        mask = _padded_mask(queries, keys, "bool")
    kwargs = {"is_causal": False} if case == "bidirectional" else {}
    with torch.autocast("cpu", dtype=BF16):
        out, _ = attention.lorakit_sdpa(module, q, k, v, mask, **kwargs)
    assert seen == [] and out.dtype == BF16 and out.shape == (2, queries, 4, 16)
    expected, leaves = _reference(module, q, k, v, mask, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad.to(BF16))
    expected.backward(grad)
    rows = slice(None) if case not in ("bool", "float", "chunk") else slice(1, None)  # row 0's pads: any finite
    assert torch.isfinite(out).all()
    assert_close(out[rows].float(), expected[rows], rtol=2e-2, atol=2e-2)
    for name, ours, ref in zip("qkv", (q, k, v), leaves, strict=True):
        scale = ref.grad.abs().max().item()
        assert_close(ours.grad[rows].float(), ref.grad[rows], rtol=3e-2, atol=2e-2 * scale, msg=name)
    if rows != slice(None):  # row 0's queries that see a key: as the reference
        seeing = slice(3 - (keys - queries), None) if case != "chunk" else slice(None)
        assert_close(out[0, seeing].float(), expected[0, seeing], rtol=2e-2, atol=2e-2)
        scale = leaves[0].grad.abs().max().item()
        assert_close(q.grad[0, :, seeing].float(), leaves[0].grad[0, :, seeing], rtol=3e-2, atol=2e-2 * scale)


def test_the_bf16_products_refuse_what_they_do_not_compute(choice, monkeypatch):
    """Dropout, a position bias and a per-head mask go to transformers' function (here in float32, fp32 mode
    being the fallback for short sequences) instead of being computed wrongly."""
    choice("matmul")
    seen = _spy(monkeypatch)
    q, k, v = _qkv(12)
    attention.lorakit_sdpa(_Module(), q, k, v, None, dropout=0.1)
    attention.lorakit_sdpa(_Module(), q, k, v, None, position_bias=torch.zeros(1, 4, 12, 12, dtype=BF16))
    attention.lorakit_sdpa(_Module(), q, k, v, torch.ones(2, 4, 12, 12, dtype=torch.bool))
    attention.lorakit_sdpa(_Module(), *_qkv(12, torch.float16), None)
    assert seen == [torch.float32] * 4


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config)


def test_fuse_forwards_installs_it_and_unfuse_and_unload_take_it_away(tmp_path):
    model = _tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    fuse_forwards(model)
    assert model.config._attn_implementation == attention.NAME
    model.save_pretrained(tmp_path / "saved")
    assert attention.NAME not in json.dumps(json.loads((tmp_path / "saved" / "config.json").read_text()))
    unfuse_forwards(model)
    assert model.config._attn_implementation == "sdpa"
    fuse_forwards(model)
    lorakit.unload(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("forced", ["matmul", "fp32", "bf16"])
def test_a_bf16_mixed_training_step_with_either_attention_follows_float32(choice, forced):
    """Loss and adapter gradients of a bf16 base under autocast (small random adapters, as in
    test_mixed_precision_layers), attention in float32 or in bf16: float32 training's, to bf16 rounding."""
    ids = torch.randint(1, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    choice(forced)
    results = []
    for dtype in (BF16, torch.float32):
        model = _tiny_llama().to(dtype)
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
        randomize_adapters(model, scale=0.05)
        fuse_forwards(model)
        with torch.autocast("cpu", dtype=BF16, enabled=dtype == BF16):
            loss = lorakit.causal_lm_loss(model, ids, ids)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g.dtype == torch.float32 for g in grads.values())
        results.append((loss.float(), grads))
    (loss, grads), (loss_ref, grads_ref) = results
    assert_close(loss, loss_ref, rtol=1e-2, atol=1e-2)
    for name, grad in grads.items():
        scale = grads_ref[name].abs().max().item()
        assert_close(grad, grads_ref[name], rtol=4e-2, atol=4e-2 * scale, msg=name)


def test_a_padding_mask_becomes_a_bias_once_per_forward_not_once_per_layer():
    """Every layer of a forward gets the same mask tensor: its bias is built once, and again when it changes."""
    mask = _padded_mask(6, 6, "bool")
    first = attention._bias(mask, False, 2, 6, 6, BF16, mask.device)
    assert attention._bias(mask, False, 2, 6, 6, BF16, mask.device) is first
    mask[1, :, :, 0] = False  # in place: another mask now
    again = attention._bias(mask, False, 2, 6, 6, BF16, mask.device)
    assert again is not first and bool((again[1, 0, :, 0] == torch.finfo(BF16).min).all())
    with torch.inference_mode():
        frozen = _padded_mask(6, 6, "bool")
        assert attention._bias(frozen, False, 2, 6, 6, BF16, frozen.device) is attention._bias(
            frozen, False, 2, 6, 6, BF16, frozen.device
        )
