"""Kernels against their torch references, and the references against naive dense attention.

Triton kernels run on CPU through TRITON_INTERPRET=1 (set in conftest.py).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import tandem_kernels
from tandem_kernels import reference

from .conftest import BF16_DOT_BROKEN, requires_triton

BLOCK_SIZE = 16
# Largest |kernel - reference| over largest |reference|, per dtype.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class PagedKV:
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [num_seqs] int32


def make_paged_kv(
    context_lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator
) -> PagedKV:
    """A cache whose pages sit in a random order, with spare pages and random data in every unused slot.

    Table rows are padded with block 0, which belongs to some sequence, so reading past a
    sequence's end picks up real, wrong data instead of zeros.
    """
    pages = [-(-n // BLOCK_SIZE) for n in context_lens]
    num_blocks = sum(pages) + 3
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(context_lens), max(pages) + 2, dtype=torch.int32)
    used = 0
    for s, n in enumerate(pages):
        block_tables[s, :n] = order[used : used + n]
        used += n
    return PagedKV(k_cache, v_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32))


def naive_attention(
    q: torch.Tensor, kv: PagedKV, cu_seqlens_q: list[int], kv_group_of_head: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense causal attention in float64, one sequence at a time, KV copied out token by token.

    `kv_group_of_head` overrides which kv head each query head reads; it exists only so a test
    can check that a wrong mapping is caught.
    """
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = kv.k_cache.shape[2]
    if kv_group_of_head is None:
        kv_group_of_head = torch.arange(num_heads) // (num_heads // num_kv_heads)
    scale = head_dim**-0.5
    out = torch.empty(q.shape, dtype=torch.float64)
    for s, kv_len in enumerate(kv.context_lens.tolist()):
        start, end = cu_seqlens_q[s], cu_seqlens_q[s + 1]
        slots = [
            int(kv.block_tables[s, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE for p in range(kv_len)
        ]
        k = kv.k_cache.reshape(-1, num_kv_heads, head_dim)[slots].double()[
            :, kv_group_of_head
        ]  # [kv_len, H, D]
        v = kv.v_cache.reshape(-1, num_kv_heads, head_dim)[slots].double()[:, kv_group_of_head]
        scores = torch.einsum("qhd,khd->hqk", q[start:end].double(), k) * scale
        q_pos = torch.arange(kv_len - (end - start), kv_len)
        visible = torch.arange(kv_len)[None, :] <= q_pos[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max())


# (context_lens, num_heads, num_kv_heads, head_dim): GQA ratios 1, 3 and 4, lengths that are
# 1, exactly one page, and not multiples of the page size.
DECODE_CASES = [
    ([1, 17, 100], 4, 4, 64),
    ([5, 250, 33], 6, 2, 128),
    ([300, 16, 31, 2], 8, 2, 64),
    ([47, 129], 12, 4, 80),
]


@pytest.mark.parametrize(("context_lens", "num_heads", "num_kv_heads", "head_dim"), DECODE_CASES)
def test_reference_decode_matches_naive(context_lens, num_heads, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(0)
    kv = make_paged_kv(context_lens, num_kv_heads, head_dim, torch.float32, gen)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen)
    out = reference.paged_decode_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, head_dim**-0.5
    )
    expected = naive_attention(q, kv, list(range(len(context_lens) + 1)))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, expected) < 1e-5


def test_naive_comparison_catches_mask_and_gqa_bugs():
    # The checks above are only worth something if the usual mistakes move the output past tolerance.
    gen = torch.Generator().manual_seed(1)
    kv = make_paged_kv([33, 70], 2, 64, torch.float32, gen)
    q = torch.randn(2, 6, 64, generator=gen)
    cu = [0, 1, 2]
    expected = naive_attention(q, kv, cu)
    one_short = PagedKV(kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens - 1)
    assert rel_err(naive_attention(q, one_short, cu), expected) > 1e-2
    interleaved = torch.arange(6) % 2  # head h -> kv head h % num_kv_heads instead of h // group
    assert rel_err(naive_attention(q, kv, cu, kv_group_of_head=interleaved), expected) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_decode_low_precision(dtype):
    gen = torch.Generator().manual_seed(2)
    kv = make_paged_kv([3, 90], 2, 64, dtype, gen)
    q = torch.randn(2, 8, 64, generator=gen).to(dtype)
    out = reference.paged_decode_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 64**-0.5
    )
    assert out.dtype == dtype
    assert rel_err(out, naive_attention(q, kv, [0, 1, 2])) < TOLERANCE[dtype]


# (q_lens, context_lens, num_heads, num_kv_heads, head_dim)
PREFILL_CASES = [
    ([37], [37], 6, 2, 64),  # a whole prompt: SDPA's is_causal path
    ([5, 20, 1, 16], [40, 20, 17, 50], 8, 2, 64),  # cached prefixes and a full prompt, packed
    ([9, 33], [9, 100], 3, 1, 128),
]


@pytest.mark.parametrize(("q_lens", "context_lens", "num_heads", "num_kv_heads", "head_dim"), PREFILL_CASES)
def test_reference_prefill_matches_naive(q_lens, context_lens, num_heads, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(3)
    kv = make_paged_kv(context_lens, num_kv_heads, head_dim, torch.float32, gen)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], num_heads, head_dim, generator=gen)
    cu_seqlens_q = torch.tensor(cu, dtype=torch.int32)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, cu_seqlens_q, kv.context_lens, head_dim**-0.5)
    out = reference.paged_prefill_attention(*args)
    assert out.shape == q.shape
    assert rel_err(out, naive_attention(q, kv, cu)) < 1e-5
    torch.testing.assert_close(tandem_kernels.paged_prefill_attention(*args), out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("q_lens", "context_lens", "num_heads", "num_kv_heads", "head_dim"), PREFILL_CASES)
def test_fused_prefill_matches_naive(q_lens, context_lens, num_heads, num_kv_heads, head_dim, dtype):
    # The CUDA path (SDPA with a bottom-right causal bias over pages gathered in the cache's
    # dtype). Here on CPU SDPA materializes that bias: this checks the alignment, the gather and
    # the GQA mapping; bench_gpu's kernels section checks the flash kernel on a GPU.
    from tandem_kernels.prefill_attention import paged_prefill_attention as fused

    gen = torch.Generator().manual_seed(4)
    kv = make_paged_kv(context_lens, num_kv_heads, head_dim, dtype, gen)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    out = fused(q, kv.k_cache, kv.v_cache, kv.block_tables, cu, context_lens, scale)  # host lists
    assert out.shape == q.shape and out.dtype == dtype
    # bf16: its output rounding alone is up to 2e-3; a misaligned mask or head is off by ~1.
    assert rel_err(out, naive_attention(q, kv, cu)) < {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    as_tensors = (torch.tensor(cu, dtype=torch.int32), kv.context_lens)
    assert torch.equal(fused(q, kv.k_cache, kv.v_cache, kv.block_tables, *as_tensors, scale), out)


def test_fused_prefill_refuses_chunks_longer_than_their_context():
    from tandem_kernels.prefill_attention import paged_prefill_attention as fused

    kv = make_paged_kv([20, 8], 2, 64, torch.float32, torch.Generator().manual_seed(0))
    q = torch.randn(14, 4, 64)
    with pytest.raises(ValueError, match="sequence 1: 9 queries over 8 cached positions"):
        fused(q, kv.k_cache, kv.v_cache, kv.block_tables, [0, 5, 14], [20, 8], 0.125)
    with pytest.raises(ValueError, match="2 sequences need 3 bounds"):
        fused(q, kv.k_cache, kv.v_cache, kv.block_tables, [0, 14], [20, 8], 0.125)


# Decodes (q_len 1), whole prompts and chunks after a cached prefix, packed in one call.
GATHERED_CASES = [
    ([1, 1, 1], [1, 17, 300], 6, 2, 64),
    ([1, 37, 5, 1], [40, 37, 45, 16], 8, 2, 64),
    ([1, 9, 33], [129, 9, 100], 3, 1, 128),
]


@pytest.mark.parametrize(("q_lens", "context_lens", "num_heads", "num_kv_heads", "head_dim"), GATHERED_CASES)
def test_gathered_attention_matches_naive(q_lens, context_lens, num_heads, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(5)
    kv = make_paged_kv(context_lens, num_kv_heads, head_dim, torch.float32, gen)
    cu_q, blocks = [0], []
    for s, (n, ctx) in enumerate(zip(q_lens, context_lens)):
        cu_q.append(cu_q[-1] + n)
        blocks += kv.block_tables[s, : -(-ctx // BLOCK_SIZE)].tolist()
    q = torch.randn(cu_q[-1], num_heads, head_dim, generator=gen)
    out = tandem_kernels.gathered_attention(
        q, kv.k_cache, kv.v_cache, torch.tensor(blocks), cu_q, context_lens, head_dim**-0.5
    )
    assert out.shape == q.shape
    assert rel_err(out, naive_attention(q, kv, cu_q)) < 1e-5


# Decodes batched in buckets (q_len 1, first), then prefill chunks: lengths equal, one apart,
# exact block multiples, 1, and far apart (several buckets).
BUCKETED_CASES = [
    ([32, 32, 32, 32], [], 6, 2, 64),  # one bucket, no padding: no mask
    ([1, 17, 16, 33, 47, 300, 301, 290, 2000], [], 8, 2, 64),
    ([40, 39, 41, 16, 100], [37, 5], 9, 3, 64),
    ([129], [9, 33], 3, 1, 128),  # one decode: a bucket of its own, sliced to its context
]


@pytest.mark.parametrize(
    ("decode_lens", "prefill_q_lens", "num_heads", "num_kv_heads", "head_dim"), BUCKETED_CASES
)
def test_bucketed_decodes_match_naive(decode_lens, prefill_q_lens, num_heads, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(7)
    prefill_ctx = [n + 11 for n in prefill_q_lens]  # chunks after a cached prefix
    kv = make_paged_kv(decode_lens + prefill_ctx, num_kv_heads, head_dim, torch.float32, gen)
    tables = kv.block_tables.tolist()
    nd = len(decode_lens)
    buckets = tandem_kernels.plan_decode_buckets(tables[:nd], decode_lens, BLOCK_SIZE)
    assert sorted(int(r) for b in buckets for r in b.rows) == list(range(nd))  # each decode once
    cu_q, blocks = [nd], []
    for s, (n, ctx) in enumerate(zip(prefill_q_lens, prefill_ctx), start=nd):
        cu_q.append(cu_q[-1] + n)
        blocks += tables[s][: -(-ctx // BLOCK_SIZE)]
    q = torch.randn(cu_q[-1], num_heads, head_dim, generator=gen)
    out = tandem_kernels.gathered_attention(
        q,
        kv.k_cache,
        kv.v_cache,
        torch.tensor(blocks, dtype=torch.int64),
        cu_q,
        prefill_ctx,
        head_dim**-0.5,
        buckets,
    )
    assert rel_err(out, naive_attention(q, kv, list(range(nd)) + cu_q)) < 1e-5


def test_decode_buckets_bound_their_padding():
    lens = [1, 17, 16, 33, 47, 300, 301, 290, 2000, 64, 64, 65]
    tables = [list(range(100 * i, 100 * i + 200)) for i in range(len(lens))]
    buckets = reference.plan_decode_buckets(tables, lens, BLOCK_SIZE, max_padding=0.25)
    for b in buckets:
        members = [lens[int(r)] for r in b.rows]
        held = sum(-(-n // BLOCK_SIZE) for n in members)
        width = b.blocks.numel() // len(members)
        assert width * len(members) <= 1.25 * held  # padding within the bound
        assert width == max(-(-n // BLOCK_SIZE) for n in members)
        # Each member's own blocks first, then copies of its last one (never another's blocks).
        for j, r in enumerate(b.rows.tolist()):
            own = -(-lens[r] // BLOCK_SIZE)
            row = b.blocks[j * width : (j + 1) * width].tolist()
            assert row == tables[r][:own] + [tables[r][own - 1]] * (width - own)
        if len(members) == 1:
            assert b.mask is None and b.kv_len == members[0]
    assert len(buckets) < len(lens)  # similar lengths do share
    # With no padding allowed, only equal block counts share a bucket.
    strict = reference.plan_decode_buckets(tables, lens, BLOCK_SIZE, max_padding=0.0)
    for b in strict:
        assert len({-(-lens[int(r)] // BLOCK_SIZE) for r in b.rows}) == 1
    # A bucket's gathered K and V stay within the byte budget (a lone sequence may exceed it).
    capped = reference.plan_decode_buckets(
        tables, lens, BLOCK_SIZE, max_padding=1.0, position_bytes=1000, max_bucket_bytes=100_000
    )
    for b in capped:
        assert b.blocks.numel() * BLOCK_SIZE * 1000 <= 100_000 or b.rows.numel() == 1
    assert len(capped) > len(reference.plan_decode_buckets(tables, lens, BLOCK_SIZE, max_padding=1.0))


def test_prefill_last_token_equals_decode():
    # The two paths must agree on the one position they share.
    gen = torch.Generator().manual_seed(4)
    kv = make_paged_kv([21, 64], 2, 64, torch.float32, gen)
    q = torch.randn(2 * 7, 4, 64, generator=gen)
    cu_seqlens_q = torch.tensor([0, 7, 14], dtype=torch.int32)
    prefill = reference.paged_prefill_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, cu_seqlens_q, kv.context_lens, 0.125
    )
    decode = reference.paged_decode_attention(
        q[[6, 13]], kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.125
    )
    torch.testing.assert_close(prefill[[6, 13]], decode, rtol=1e-5, atol=1e-6)


def make_store_inputs(
    num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator
):
    """Keys and values as non-contiguous views with different strides, so mixing them up shows.

    The key is a slice of a fused qkv projection, as the model produces it; the value's heads
    are padded, so its head stride differs from the key's too.
    """
    num_blocks = 9
    qkv = torch.randn(num_tokens, 4 + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    key = qkv[:, 4 : 4 + num_kv_heads]
    value = torch.randn(num_tokens, num_kv_heads, 2 * head_dim, generator=gen).to(dtype)[..., :head_dim]
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(k_cache.shape, generator=gen).to(dtype)
    slot_mapping = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:num_tokens]
    return key, value, k_cache, v_cache, slot_mapping


def test_reference_store_kvcache_writes_each_slot():
    gen = torch.Generator().manual_seed(5)
    key, value, k_cache, v_cache, slots = make_store_inputs(20, 2, 64, torch.float32, gen)
    before = k_cache.clone()
    reference.store_kvcache(key, value, k_cache, v_cache, slots)
    blocks, offsets = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    assert torch.equal(k_cache[blocks, offsets], key)
    assert torch.equal(v_cache[blocks, offsets], value)
    untouched = torch.ones(k_cache.shape[:2], dtype=torch.bool)
    untouched[blocks, offsets] = False
    assert torch.equal(k_cache[untouched], before[untouched])


@pytest.fixture
def triton_kernels():
    """The Triton launchers, checked to run in the interpreter when there is no GPU."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from tandem_kernels.paged_decode_attention import _paged_decode_attention_kernel
    from tandem_kernels.paged_decode_attention import paged_decode_attention as decode
    from tandem_kernels.store_kvcache import store_kvcache as store

    interpreted = all(isinstance(f, InterpretedFunction) for f in (_paged_decode_attention_kernel, tl.cdiv))
    if not torch.cuda.is_available() and not interpreted:
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU; "
            "set it in the environment or at the top of tests/conftest.py"
        )
    return store, decode


@requires_triton
@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim", "dtype"),
    [(1, 64, torch.float32), (3, 128, torch.float32), (8, 64, torch.float16), (2, 128, torch.bfloat16)],
)
def test_triton_store_kvcache_equals_reference(triton_kernels, num_kv_heads, head_dim, dtype):
    store, _ = triton_kernels
    gen = torch.Generator().manual_seed(6)
    key, value, k_cache, v_cache, slots = make_store_inputs(37, num_kv_heads, head_dim, dtype, gen)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    reference.store_kvcache(key, value, k_expected, v_expected, slots)
    store(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)


@requires_triton
@pytest.mark.parametrize(
    ("context_lens", "num_heads", "num_kv_heads", "head_dim", "dtype"),
    [case + (torch.float32,) for case in DECODE_CASES]
    + [
        ([7, 140], 8, 2, 128, torch.float16),
        pytest.param([60, 3], 6, 2, 64, torch.bfloat16, marks=BF16_DOT_BROKEN),
    ],
)
def test_triton_decode_matches_reference(
    triton_kernels, context_lens, num_heads, num_kv_heads, head_dim, dtype
):
    _, decode = triton_kernels
    gen = torch.Generator().manual_seed(7)
    kv = make_paged_kv(context_lens, num_kv_heads, head_dim, dtype, gen)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen).to(dtype)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, head_dim**-0.5)
    out = decode(*args)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, reference.paged_decode_attention(*args)) < TOLERANCE[dtype]


@requires_triton
def test_triton_decode_rejects_bad_strides(triton_kernels):
    _, decode = triton_kernels
    gen = torch.Generator().manual_seed(8)
    kv = make_paged_kv([5], 2, 64, torch.float32, gen)
    q = torch.randn(1, 4, 64, generator=gen)
    with pytest.raises(AssertionError, match="head_dim must be contiguous"):
        decode(
            q.transpose(1, 2).contiguous().transpose(1, 2),
            kv.k_cache,
            kv.v_cache,
            kv.block_tables,
            kv.context_lens,
            0.1,
        )


def test_dispatcher_keeps_cpu_tensors_off_triton(monkeypatch):
    monkeypatch.delenv("TANDEM_KERNELS", raising=False)

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton path must not run for CPU tensors")

    monkeypatch.setattr(tandem_kernels, "_triton_store_kvcache", no_triton)
    monkeypatch.setattr(tandem_kernels, "_triton_paged_decode_attention", no_triton)
    gen = torch.Generator().manual_seed(9)
    key, value, k_cache, v_cache, slots = make_store_inputs(4, 2, 64, torch.float32, gen)
    tandem_kernels.store_kvcache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE], key)
    kv = make_paged_kv([10], 2, 64, torch.float32, gen)
    q = torch.randn(1, 4, 64, generator=gen)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.125)
    # The reference, or the C++ CPU op where it was built (its own sum order).
    torch.testing.assert_close(
        tandem_kernels.paged_decode_attention(*args), reference.paged_decode_attention(*args)
    )


@requires_triton
def test_dispatcher_env_forces_triton(monkeypatch):
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    calls = []
    monkeypatch.setattr(
        tandem_kernels, "_triton_paged_decode_attention", lambda *args: calls.append(args) or args[0]
    )
    gen = torch.Generator().manual_seed(10)
    kv = make_paged_kv([10], 2, 64, torch.float32, gen)
    q = torch.randn(1, 4, 64, generator=gen)
    tandem_kernels.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.125)
    assert len(calls) == 1
    monkeypatch.setenv("TANDEM_KERNELS", "cuda")
    with pytest.raises(ValueError, match="TANDEM_KERNELS"):
        tandem_kernels.paged_decode_attention(
            q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.125
        )


def test_submodule_import_keeps_public_functions():
    # `tandem_kernels.store_kvcache` is both a submodule and the public op; the op must win.
    if tandem_kernels.triton_available():
        importlib.import_module("tandem_kernels.store_kvcache")
        importlib.import_module("tandem_kernels.paged_decode_attention")
    assert callable(tandem_kernels.store_kvcache)
    assert callable(tandem_kernels.paged_decode_attention)


def test_package_imports_without_triton(tmp_path):
    # A CPU-only install has no Triton; the package must still import and fall back.
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('triton hidden by the test')\n")
    code = (
        "import torch, tandem_kernels as tk\n"
        "assert not tk.triton_available()\n"
        "k = torch.zeros(2, 16, 1, 8); v = torch.zeros_like(k)\n"
        "tk.store_kvcache(torch.ones(1, 1, 8), torch.ones(1, 1, 8), k, v, torch.tensor([17]))\n"
        "assert k[1, 1].sum() == 8\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("TANDEM_KERNELS", None)
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@requires_triton
@pytest.mark.parametrize("partition_size", [None, 64, 128])
def test_triton_decode_split_context_matches_reference(triton_kernels, partition_size):
    """Contexts longer than a partition are split (flash-decoding) and combined; lengths hit
    partition boundaries exactly, fall one short or over, and leave later partitions empty."""
    _, decode = triton_kernels
    gen = torch.Generator().manual_seed(9)
    kv = make_paged_kv([700, 1, 513, 128, 64], 2, 64, torch.float32, gen)
    q = torch.randn(5, 8, 64, generator=gen)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 64**-0.5)
    out = decode(*args, partition_size=partition_size)
    assert rel_err(out, reference.paged_decode_attention(*args)) < TOLERANCE[torch.float32]
    unsplit = decode(*args, partition_size=1 << 20)  # one partition: the single-kernel path
    assert rel_err(out, unsplit) < TOLERANCE[torch.float32]


@requires_triton
def test_store_kvcache_skips_padding_slots(triton_kernels):
    """Slot -1 marks a padding row (CUDA-graph batches padded to a captured size): nothing written."""
    store, _ = triton_kernels
    gen = torch.Generator().manual_seed(10)
    key, value, k_cache, v_cache, slots = make_store_inputs(12, 2, 64, torch.float32, gen)
    slots[[0, 5, 11]] = -1
    for write in (store, reference.store_kvcache):
        k, v = k_cache.clone(), v_cache.clone()
        write(key, value, k, v, slots)
        live = slots >= 0
        blocks, offsets = slots[live] // BLOCK_SIZE, slots[live] % BLOCK_SIZE
        assert torch.equal(k[blocks, offsets], key[live]) and torch.equal(v[blocks, offsets], value[live])
        untouched = torch.ones(k.shape[:2], dtype=torch.bool)
        untouched[blocks, offsets] = False
        assert torch.equal(k[untouched], k_cache[untouched]) and torch.equal(v[untouched], v_cache[untouched])


def test_the_adaptive_partition_gives_a_lone_long_sequence_programs_for_every_sm():
    # H200: 132 SMs. One 8K-token sequence, 8 kv heads: 512 tokens a partition made 128 programs
    # of eight tiles each; about four programs per SM means 128 tokens (512 programs).
    from tandem_kernels.paged_decode_attention import _BLOCK_N, _PARTITION, adaptive_partition

    assert adaptive_partition(8, 8192, 132) == 128
    assert adaptive_partition(8, 2048, 132) == _BLOCK_N  # never below one tile
    assert adaptive_partition(64 * 8, 2048, 132) == _PARTITION  # enough pairs: the default's size
    for pairs in (1, 3, 8, 40, 128, 4096):
        for ctx in (16, 1000, 4096, 32768):
            p = adaptive_partition(pairs, ctx, 132)
            assert p & (p - 1) == 0 and _BLOCK_N <= p <= _PARTITION and p % _BLOCK_N == 0
