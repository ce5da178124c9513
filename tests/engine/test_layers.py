"""Building blocks against plain torch references, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers.linear import Linear, onednn_available
from engine.layers.norm import RMSNorm


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("num_rows", [1, 3, 8, 33, 257])
@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_linear_matches_f_linear(num_rows, bias):
    torch.manual_seed(num_rows)
    layer = Linear(96, 160, bias=bias)
    x = torch.randn(num_rows, 96)
    expected = F.linear(x, layer.weight, layer.bias)
    assert layer.prepack()
    got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prepack_is_skipped_off_cpu_dtypes():
    layer = Linear(8, 8).to(torch.float64)
    assert not layer.prepack()
    x = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_reference(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(5, 64).to(dtype)
    xf = x.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * norm.weight
    torch.testing.assert_close(norm(x), ref)


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
def test_release_dense_keeps_outputs_and_frees_the_weight():
    torch.manual_seed(1)
    layer = Linear(32, 48)
    x = torch.randn(4, 32)
    expected = layer(x)
    assert layer.prepack(release_dense=True)
    assert layer.weight.numel() == 0
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
