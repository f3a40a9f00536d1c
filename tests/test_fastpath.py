"""The few-rows CPU path for linear layers gives the same numbers as the ordinary one."""

import torch
from torch import nn
from torch.testing import assert_close

from lorakit.fastpath import enable_skinny_linear, skinny_matmul


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


def test_skinny_linear_keeps_gradients_on_the_ordinary_path():
    layer = nn.Linear(6, 4)
    enable_skinny_linear(layer)
    x = torch.randn(3, 6, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_skinny_matmul():
    x, w = torch.randn(7, 16), torch.randn(9, 16)
    assert_close(skinny_matmul(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
