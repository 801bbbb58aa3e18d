"""Triton kernels for a layer's elementwise work: RMSNorm with the residual add, rotary, SiLU-and-mul.

In PyTorch ops each of these is several kernels (an RMSNorm alone: cast, square, mean, add, rsqrt,
two multiplies, cast back), each reading and writing the whole activation. A decode step of a
small batch is nothing but tiny kernels, and even replayed from a CUDA graph each costs a couple
of microseconds of GPU time: about 40 per layer, over a thousand per step of Llama-3-8B. Here
each is one kernel, so a layer's elementwise work is four (two norms, rotary, SiLU-and-mul).

The arithmetic is the references' (reference.py, Hugging Face's Llama): float32 statistics, and
each intermediate the torch ops round to the input's dtype is rounded here too, so outputs agree
to the last bit but for the float32 reductions' summation order and exp/rsqrt's last bits.

Shapes:
    rms_norm            x, residual [T, N] (rows contiguous), weight [N] -> out [T, N]
                        (and x + residual [T, N] when residual is given)
    rotary              q [T, Hq, D], k [T, Hk, D] (head_dim contiguous), cos, sin [T, 1, D]
                        (or [T, D]) -> q', k' contiguous, rotate-half layout
    silu_and_mul        gate_up [T, 2I] (rows contiguous) -> [T, I]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round(x, dtype: tl.constexpr, BF16: tl.constexpr):
    """x rounded to dtype to nearest, ties to even, as torch rounds (a GPU's default conversion; the
    interpreter would truncate to bf16 without being told)."""
    if BF16:
        return x.to(dtype, fp_downcast_rounding="rtne")
    else:
        return x.to(dtype)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    x_stride,
    res_stride,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    BF16: tl.constexpr,
):
    # One program per row: a whole hidden vector (4,096 for Llama-3-8B) is one tile.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        # The residual stream, rounded as `x + residual` in x's dtype is.
        x = _round(x.to(tl.float32) + r.to(tl.float32), x.dtype, BF16)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    h = x.to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * _round(h * inv, x.dtype, BF16).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, _round(out, x.dtype, BF16), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (or of x + residual, then returned too); see reference.rms_norm."""
    assert x.dim() == 2 and x.stride(-1) == 1, "x must be [T, N] with contiguous rows"
    t, n = x.shape
    assert weight.shape == (n,) and weight.is_contiguous(), (weight.shape, x.shape)
    assert weight.dtype == x.dtype, (weight.dtype, x.dtype)
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    res_out = None
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, residual.dtype)
        assert residual.stride(-1) == 1, "residual rows must be contiguous"
        res_out = torch.empty_like(out)
    if t:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(t,)](
            x,
            residual if residual is not None else x,
            weight,
            out,
            res_out if res_out is not None else out,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            n,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            BF16=x.dtype == torch.bfloat16,
            num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16,
        )
    return out if res_out is None else (out, res_out)


@triton.jit
def _rotate_heads(
    src, stride_h, dst, num_heads, h, d, dmask, c1, c2, s1, s2, HALF: tl.constexpr, BF16: tl.constexpr
):
    """One token's heads: first half x1*c - x2*s, second half x2*c + x1*s, each product and sum
    rounded to the input's dtype as the torch ops round them."""
    mask = (h[:, None] < num_heads) & dmask[None, :]
    src_offs = h[:, None] * stride_h + d[None, :]
    x1 = tl.load(src + src_offs, mask=mask, other=0.0)
    x2 = tl.load(src + src_offs + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    a1 = _round(f1 * c1[None, :], dt, BF16).to(tl.float32)
    b1 = _round(f2 * s1[None, :], dt, BF16).to(tl.float32)
    a2 = _round(f2 * c2[None, :], dt, BF16).to(tl.float32)
    b2 = _round(f1 * s2[None, :], dt, BF16).to(tl.float32)
    dst_offs = h[:, None] * (2 * HALF) + d[None, :]
    tl.store(dst + dst_offs, _round(a1 - b1, dt, BF16), mask=mask)
    tl.store(dst + dst_offs + HALF, _round(a2 + b2, dt, BF16), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    cos_stride,
    sin_stride,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BF16: tl.constexpr,
):
    # One program per token rotates all its q and k heads: its angles are loaded once.
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    c1 = tl.load(cos_ptr + t * cos_stride + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * cos_stride + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * sin_stride + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * sin_stride + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + t * q_stride_t,
        q_stride_h,
        q_out_ptr + t * (NUM_Q_HEADS * 2 * HALF),
        NUM_Q_HEADS,
        tl.arange(0, BLOCK_HQ),
        d,
        dmask,
        c1,
        c2,
        s1,
        s2,
        HALF,
        BF16,
    )
    _rotate_heads(
        k_ptr + t * k_stride_t,
        k_stride_h,
        k_out_ptr + t * (NUM_K_HEADS * 2 * HALF),
        NUM_K_HEADS,
        tl.arange(0, BLOCK_HK),
        d,
        dmask,
        c1,
        c2,
        s1,
        s2,
        HALF,
        BF16,
    )


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of q and k (see reference.rotary), in one kernel."""
    assert q.dim() == 3 and k.dim() == 3, (q.shape, k.shape)
    t, num_q, dim = q.shape
    assert k.shape[0] == t and k.shape[2] == dim and dim % 2 == 0, (q.shape, k.shape)
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "head_dim must be contiguous"
    assert q.dtype == k.dtype, (q.dtype, k.dtype)
    cos, sin = cos.reshape(t, -1), sin.reshape(t, -1)
    assert cos.shape == sin.shape == (t, dim), (cos.shape, sin.shape, dim)
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1
    q_out = torch.empty((t, num_q, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, k.shape[1], dim), dtype=k.dtype, device=k.device)
    if t:
        _rotary_kernel[(t,)](
            q,
            k,
            cos,
            sin,
            q_out,
            k_out,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            sin.stride(0),
            NUM_Q_HEADS=num_q,
            NUM_K_HEADS=k.shape[1],
            HALF=dim // 2,
            BLOCK_HQ=triton.next_power_of_2(num_q),
            BLOCK_HK=triton.next_power_of_2(k.shape[1]),
            BLOCK_D=triton.next_power_of_2(dim // 2),
            BF16=q.dtype == torch.bfloat16,
        )
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, n_cols, BLOCK: tl.constexpr, BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_stride + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = _round(g / (1.0 + tl.exp(-g)), gate.dtype, BF16)  # rounded, as F.silu's output is
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, _round(out, gate.dtype, BF16), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up = [gate | up]: [T, 2I] -> [T, I] (see reference.silu_and_mul)."""
    assert gate_up.dim() == 2 and gate_up.stride(-1) == 1, "gate_up must be [T, 2I] with contiguous rows"
    t, width = gate_up.shape
    assert width % 2 == 0, gate_up.shape
    n = width // 2
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(t, triton.cdiv(n, block))](
            gate_up, out, gate_up.stride(0), n, BLOCK=block, BF16=gate_up.dtype == torch.bfloat16
        )
    return out
