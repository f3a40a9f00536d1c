"""The CPU paths for linear layers (oneDNN for many rows, transposed for few) give the ordinary results."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from lorakit import fastpath
from lorakit.fastpath import skinny_matmul
from lorakit.patches import enable_skinny_linear, remove_patches


def test_skinny_linear_matches_linear_for_every_row_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 8, bias=False))
    reference = [m.forward for m in model]
    assert enable_skinny_linear(model) == 2
    assert enable_skinny_linear(model) == 0  # idempotent
    for rows in (1, 2, 5, 32, 33, 100):
        x = torch.randn(rows, 3, 24)[:, 0]  # a non-contiguous input
        with torch.no_grad():
            expected = x
            for fwd in reference:
                expected = fwd(expected)
            assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
            assert_close(model(x.view(rows, 1, 24)), expected.view(rows, 1, 8), rtol=1e-5, atol=1e-5)
    assert str(model).count("lorakit: few-row CPU fast path") == 2  # visible in print(model)
    assert remove_patches(model) == 2 and "lorakit" not in str(model)
    assert all("forward" not in m.__dict__ for m in model)


def test_skinny_linear_keeps_gradients_on_the_ordinary_path():
    layer = nn.Linear(6, 4)
    enable_skinny_linear(layer)
    x = torch.randn(3, 6, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_skinny_matmul():
    x, w = torch.randn(7, 16), torch.randn(9, 16)
    assert_close(skinny_matmul(x, w), x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(40, 24), (3, 17, 24), (33, 24)])
def test_linear_matches_f_linear_on_either_kernel(bias, shape, cpu_gemm):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(40, 24)
    b = torch.randn(40) if bias else None
    assert fastpath.uses_onednn(x, w, b) is (cpu_gemm == "onednn")
    assert_close(fastpath.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_keeps_autograd_few_rows_and_other_dtypes_on_pytorchs_path(cpu_gemm):
    w = torch.randn(8, 6)
    x = torch.randn(64, 6, requires_grad=True)
    assert not fastpath.uses_onednn(x, w)  # autograd needs F.linear's graph
    out = fastpath.linear(x, w)
    out.sum().backward()
    assert_close(x.grad, w.sum(0).expand(64, 6))
    with torch.no_grad():
        assert fastpath.uses_onednn(x, w) is (cpu_gemm == "onednn")
        assert not fastpath.uses_onednn(x[:32], w)  # few rows: the skinny layout's territory
        assert not fastpath.uses_onednn(x.double(), w.double())
        assert not fastpath.uses_onednn(x, w.T.contiguous().T)  # a transposed weight view


def test_cpu_gemm_choice_is_checked(monkeypatch):
    monkeypatch.setenv("LORAKIT_CPU_GEMM", "fastest")
    fastpath.onednn_enabled.cache_clear()
    try:
        with pytest.raises(ValueError, match="LORAKIT_CPU_GEMM='fastest'.*auto, onednn, blas"):
            fastpath.onednn_enabled()
    finally:
        fastpath.onednn_enabled.cache_clear()


INTEL_AMX = {
    "vendor_id": "GenuineIntel",
    "model name": "Intel(R) Xeon(R) Platinum 8480+",
    "flags": "fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile",
}
AMD_EPYC = {"vendor_id": "AuthenticAMD", "model name": "AMD EPYC 7B13", "flags": "fpu sse avx2"}


@pytest.mark.parametrize(("cpu", "onednn"), [(INTEL_AMX, False), (AMD_EPYC, True)])
def test_auto_gemm_choice_for_each_cpu_kind(monkeypatch, cpu, onednn):
    """``auto`` picks oneDNN on AMD x86-64 only, whatever CPU runs the test."""
    monkeypatch.setattr(fastpath, "_cpuinfo", lambda: cpu)
    monkeypatch.setattr(fastpath.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("LORAKIT_CPU_GEMM", "auto")
    fastpath.onednn_enabled.cache_clear()
    try:
        expected = onednn and torch.backends.mkldnn.is_available()
        assert fastpath.onednn_enabled() is expected
        x, w = torch.randn(64, 8), torch.randn(4, 8)
        assert fastpath.uses_onednn(x, w) is expected
        assert_close(fastpath.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    finally:
        fastpath.onednn_enabled.cache_clear()


def test_cpu_description_names_the_model_and_the_extensions_that_change_code_paths(monkeypatch):
    monkeypatch.setattr(fastpath, "_cpuinfo", lambda: INTEL_AMX)
    assert fastpath.cpu_description().startswith("Intel(R) Xeon(R) Platinum 8480+ (")
    assert "AVX-512 BF16, AMX)" in fastpath.cpu_description()
    monkeypatch.setattr(fastpath, "_cpuinfo", lambda: AMD_EPYC)
    assert "AMD EPYC 7B13" in fastpath.cpu_description() and "AMX" not in fastpath.cpu_description()


def test_trim_freed_memory_runs_on_glibc_and_says_so_elsewhere(monkeypatch):
    import sys

    from lorakit import fastpath

    assert fastpath.trim_freed_memory() is sys.platform.startswith("linux")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert fastpath.trim_freed_memory() is False
