"""The layer's elementwise kernels (fused_ops.py) against their references, in Triton's interpreter.

The references are the torch ops the model ran before (Hugging Face's Llama arithmetic), so the
kernels must agree with them: bit for bit where the arithmetic is the same, within one unit in the
last place of bf16 where a float32 reduction's order or exp's last bits differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton.language as tl

import tandem_kernels
from tandem_kernels import reference

from .conftest import requires_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ulps(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|actual - expected| in units of expected's dtype's spacing at expected."""
    eps = torch.finfo(expected.dtype).eps
    e = expected.float()
    spacing = torch.clamp(e.abs(), min=torch.finfo(expected.dtype).tiny) * eps
    return (actual.float() - e).abs() / spacing


@pytest.fixture
def fused(monkeypatch):
    """The kernels, with float32 -> bf16 rounding to nearest even in the interpreter as on a GPU.

    Triton's interpreter truncates that conversion (its cast ignores the rounding mode, whose
    default is round-to-nearest-even), which would put every bf16 result one unit off where a GPU
    is exact. The conversion is done by torch instead, as the references do it.
    """
    from triton.runtime import interpreter

    from tandem_kernels import fused_ops

    convert = interpreter._convert_float

    def rounded(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            as_bf16 = torch.from_numpy(np.ascontiguousarray(data).view(np.float32)).to(torch.bfloat16)
            return as_bf16.view(torch.int16).numpy().view(np.uint16)
        return convert(data, src, dst, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", rounded)
    return fused_ops


def test_references_are_the_llama_arithmetic():
    # What the model computed before these ops existed (Hugging Face's LlamaRMSNorm, rotate_half,
    # SiLU-gated MLP), so a reference change cannot slip through as "kernel equals reference".
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=gen).bfloat16()
    res = torch.randn(5, 96, generator=gen).bfloat16()
    w = torch.randn(96, generator=gen).bfloat16()
    h = (x + res).float()
    norm = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    out, new_res = reference.rms_norm(x, w, 1e-5, res)
    assert torch.equal(out, norm) and torch.equal(new_res, x + res)
    q = torch.randn(5, 4, 32, generator=gen).bfloat16()
    angles = torch.rand(5, 1, 16, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).bfloat16(), torch.cat([angles.sin()] * 2, -1).bfloat16()
    rot = torch.cat((-q[..., 16:], q[..., :16]), -1)
    assert torch.equal(reference.rotary(q, q[:, :2], cos, sin)[0], q * cos + rot * sin)
    gate_up = torch.randn(5, 64, generator=gen).bfloat16()
    assert torch.equal(reference.silu_and_mul(gate_up), F.silu(gate_up[:, :32]) * gate_up[:, 32:])


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("n", [64, 576, 4096])
def test_rms_norm_matches_reference(fused, dtype, with_residual, n):
    gen = torch.Generator().manual_seed(n)
    # Rows of very different scales, one of them a strided view (x[logit_indices] is not, a slice is).
    x = (torch.randn(7, n + 8, generator=gen) * torch.logspace(-3, 3, 7)[:, None]).to(dtype)[:, :n]
    w = (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype)
    res = torch.randn(7, n, generator=gen).to(dtype) if with_residual else None
    got = fused.rms_norm(x, w, 1e-5, res)
    want = reference.rms_norm(x, w, 1e-5, res)
    if with_residual:
        assert torch.equal(got[1], want[1]), "the new residual is one rounded add"
        got, want = got[0], want[0]
    assert got.dtype == dtype and got.shape == (7, n)
    d = ulps(got, want)
    if dtype == torch.float32:
        # The row's scale differs in its last bits (summation order, rsqrt), so whole rows may.
        assert d.max() <= 4.0
    else:
        # Rounding to 8 or 11 significant bits hides that: within one unit, and mostly exact.
        assert d.max() <= 1.0 and (d == 0).float().mean() > 0.95


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 128), (32, 8, 128), (2, 1, 32)])
def test_rotary_matches_reference_bit_for_bit(fused, dtype, heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(heads * dim)
    t = 6
    # q, k and v as the model has them: strided views into one qkv projection output.
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype) * 4
    q = qkv[:, : heads * dim].view(t, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(t, kv_heads, dim)
    angles = torch.rand(t, 1, dim // 2, generator=gen) * 1000
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
    got_q, got_k = fused.rotary(q, k, cos, sin)
    want_q, want_k = reference.rotary(q, k, cos, sin)
    assert got_q.is_contiguous() and got_k.is_contiguous()
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 1536, 2500])
def test_silu_and_mul_matches_reference(fused, dtype, n):
    gen = torch.Generator().manual_seed(n)
    gate_up = (torch.randn(5, 2 * n, generator=gen) * 6).to(dtype)
    got = fused.silu_and_mul(gate_up)
    want = reference.silu_and_mul(gate_up)
    assert got.shape == (5, n) and got.dtype == dtype
    d = ulps(got, want)
    if dtype == torch.float32:
        assert d.max() <= 4.0  # exp's last bits (numpy's or the GPU's, against torch's)
    else:
        assert d.max() <= 1.0 and (d == 0).float().mean() > 0.99


@requires_triton
def test_kernels_refuse_layouts_they_would_misread(fused):
    x = torch.randn(4, 64)
    with pytest.raises(AssertionError, match="contiguous rows"):
        fused.rms_norm(x.t(), torch.ones(4), 1e-5)
    with pytest.raises(AssertionError):
        fused.rms_norm(x, torch.ones(64, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(AssertionError, match="head_dim must be contiguous"):
        q = torch.randn(2, 4, 64).transpose(1, 2).contiguous().transpose(1, 2)
        fused.rotary(q, q, torch.ones(2, 1, 64), torch.zeros(2, 1, 64))
    with pytest.raises(AssertionError, match="contiguous rows"):
        fused.silu_and_mul(torch.randn(64, 4).t())


@requires_triton
def test_dispatcher_runs_the_kernels_when_triton_is_chosen(monkeypatch):
    calls = []
    for name in ("rms_norm", "rotary", "silu_and_mul"):
        monkeypatch.setattr(tandem_kernels, f"_triton_{name}", lambda *a, name=name: calls.append(name))
    x = torch.randn(3, 64)
    q = torch.randn(3, 2, 64)
    cos_sin = (torch.ones(3, 1, 64), torch.zeros(3, 1, 64))
    monkeypatch.setenv("TANDEM_KERNELS", "torch")
    w = torch.ones(64)
    assert torch.equal(tandem_kernels.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    assert torch.equal(tandem_kernels.rotary(q, q, *cos_sin)[0], q)  # angle 0: unchanged
    tandem_kernels.silu_and_mul(x)
    assert calls == []
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    tandem_kernels.rms_norm(x, torch.ones(64), 1e-5)
    tandem_kernels.rotary(q, q, *cos_sin)
    tandem_kernels.silu_and_mul(x)
    assert calls == ["rms_norm", "rotary", "silu_and_mul"]
