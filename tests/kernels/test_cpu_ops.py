"""The C++ CPU ops of a layer (csrc/decode_cpu.cpp) against the torch references, and the dispatch
that sends CPU float32 tensors to them.

Rotary, the KV write and the residual add are the references' arithmetic bit for bit; the norm,
SiLU and attention sum in another order, so they agree to float32 rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import tandem_kernels
from tandem_kernels import cpu_extension, reference

ops = cpu_extension.load()
pytestmark = pytest.mark.skipif(ops is None, reason="no C++ compiler: the CPU ops could not be built")


def _pages(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_is_the_reference_to_float32_rounding(with_residual):
    torch.manual_seed(0)
    for n in (64, 576, 4097):
        for t in (1, 7, 300):  # 300 rows of 4097 run on the thread pool
            for scale in (1e-3, 1.0, 1e3):
                x, res, w = torch.randn(t, n) * scale, torch.randn(t, n) * scale, torch.randn(n)
                if with_residual:
                    out, h = ops.rms_norm(x, w, 1e-5, res)
                    want, want_h = reference.rms_norm(x, w, 1e-5, res)
                    assert torch.equal(h, want_h)  # the new residual stream: one add, exact
                else:
                    out, h = ops.rms_norm(x, w, 1e-5, None)
                    want = reference.rms_norm(x, w, 1e-5)
                    assert h is x
                torch.testing.assert_close(out, want, rtol=4e-6, atol=1e-30)


def test_rotary_is_the_reference_bit_for_bit_on_slices_of_qkv():
    torch.manual_seed(0)
    for t, heads, kv_heads, d in ((1, 9, 3, 64), (37, 32, 8, 128), (5, 4, 4, 10)):
        qkv = torch.randn(t, (heads + 2 * kv_heads) * d)
        q = qkv[:, : heads * d].view(t, heads, d)  # strided views, as the model passes them
        k = qkv[:, heads * d : (heads + kv_heads) * d].view(t, kv_heads, d)
        angles = torch.randn(t, 1, d // 2) * 100
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        want_q, want_k = reference.rotary(q, k, cos, sin)
        assert torch.equal(ops.rotary(q, cos, sin), want_q)
        assert torch.equal(ops.rotary(k, cos, sin), want_k)


def test_kv_write_is_the_reference_and_refuses_a_bad_slot_before_writing():
    k_cache, v_cache = _pages(10, 16, 3, 64)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    kv = torch.randn(7, 2, 3, 64)
    key, value = kv[:, 0], kv[:, 1]  # token rows 2 * 3 * 64 floats apart
    slots = torch.tensor([3, 17, -1, 159, 0, 40, 41])
    ops.store_kvcache(key, value, k_cache, v_cache, slots)
    reference.store_kvcache(key, value, want_k, want_v, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    for bad in (160, -2):
        with pytest.raises(RuntimeError, match="out of range"):
            ops.store_kvcache(key, value, k_cache, v_cache, torch.tensor([5, 6, 7, 8, 9, 10, bad]))
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)  # nothing written


def test_silu_and_mul_is_the_reference_to_float32_rounding():
    torch.manual_seed(0)
    for t, inter in ((1, 1536), (64, 1536), (3, 7)):
        gate_up = torch.randn(t, 2 * inter) * 4
        torch.testing.assert_close(
            ops.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), rtol=2e-6, atol=1e-7
        )
    # The op's own exp (exp_fast) over its whole range: where it clamps (|x| past 87), into
    # subnormal results, and at the reference's overflow to inf in e^-x (x = -100: SiLU is -0).
    gate = torch.cat([torch.linspace(-120, 120, 4801), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.5, -88.5])])
    gate_up = torch.cat([gate, torch.full_like(gate, 1.5)])[None]
    torch.testing.assert_close(
        ops.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), rtol=2e-6, atol=1e-30
    )


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (32, 8, 128), (4, 4, 80)],  # SmolLM2, Llama-3-8B, no GQA with a size not compiled in
)
@pytest.mark.parametrize("sharpness", [1.0, 40.0])  # 40: most weights underflow (exp_fast's clamp)
def test_paged_decode_attention_is_the_reference(heads, kv_heads, head_dim, sharpness):
    block_size = 16
    k_cache, v_cache = _pages(200, block_size, kv_heads, head_dim)
    # One position, a block's end, one past it, long, and all sharing no block order.
    lens = [1, 16, 17, 100, 700, 33, 64]
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(1)).tolist()
    tables, i = [], 0
    for n in lens:
        blocks = -(-n // block_size)
        tables.append(perm[i : i + blocks])
        i += blocks
    width = max(len(t) for t in tables) + 2  # padded rows, as the runner builds them
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    packed = torch.randn(len(lens) + 3, heads, head_dim)
    q = packed[: len(lens)]  # the decode rows of a packed batch: a view
    scale = sharpness * head_dim**-0.5
    got = ops.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    want = reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    # The scores' float32 rounding (sums in another order) grows with the scale.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * sharpness)


def test_paged_decode_attention_refuses_lengths_and_blocks_outside_the_table():
    k_cache, v_cache = _pages(8, 16, 3, 64)
    q = torch.randn(2, 9, 64)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="context length 33"):
        ops.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([5, 33], dtype=torch.int32), 0.1)
    with pytest.raises(RuntimeError, match="context length 0"):
        ops.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([0, 3], dtype=torch.int32), 0.1)
    tables[1, 1] = 8
    with pytest.raises(RuntimeError, match="block 8 of sequence 1 out of range"):
        ops.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([5, 20], dtype=torch.int32), 0.1)
    k_odd, v_odd = _pages(8, 16, 3, 36)
    with pytest.raises(RuntimeError, match="head size must be a multiple of 8"):
        ops.paged_decode_attention(
            torch.randn(2, 9, 36), k_odd, v_odd, tables, torch.tensor([5, 3], dtype=torch.int32), 0.1
        )


def test_the_limits_the_decode_op_exports_are_the_ones_it_keeps():
    # The dispatcher routes by these: a limit looser than the op's sends a call into an error, a
    # stricter one sends it to the slower reference for nothing.
    lens = torch.tensor([5, 20], dtype=torch.int32)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    top, step, group = ops.DECODE_MAX_HEAD_DIM, ops.DECODE_HEAD_MULTIPLE, ops.DECODE_MAX_GROUP
    for heads, kv_heads, d, fits in (
        (2, 1, top, True),
        (2, 1, top + step, False),
        (2, 1, step, True),
        (2, 1, step + 4, False),
        (group, 1, 64, True),
        (group + 1, 1, 64, False),
    ):
        k_cache, v_cache = _pages(4, 16, kv_heads, d)
        q = torch.randn(2, heads, d)
        if fits:
            got = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1)
            want = reference.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
        else:
            with pytest.raises(RuntimeError, match="head size|query heads per KV head"):
                ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1)


def test_cpu_float32_goes_to_the_cpp_ops_and_other_cases_to_the_references(monkeypatch):
    calls: list[str] = []

    class Spy:  # records the ops' calls; their constants (the decode limits) pass through
        def __getattr__(self, name):
            found = getattr(ops, name)
            return (lambda *a: calls.append(name) or found(*a)) if callable(found) else found

    monkeypatch.setattr(tandem_kernels.cpu_extension, "loaded", lambda: Spy())
    monkeypatch.delenv("TANDEM_KERNELS", raising=False)
    x, w = torch.randn(3, 64), torch.ones(64)
    q = torch.randn(3, 2, 64)
    cos, sin = torch.ones(3, 1, 64), torch.zeros(3, 1, 64)
    k_cache, v_cache = _pages(4, 16, 2, 64)
    tables = torch.tensor([[0], [1], [2]], dtype=torch.int32)
    lens = torch.tensor([1, 2, 3], dtype=torch.int32)

    def run_all(dtype: torch.dtype) -> None:
        xs, ws, qs, cs, ss = (t.to(dtype) for t in (x, w, q, cos, sin))
        kc, vc = k_cache.to(dtype), v_cache.to(dtype)
        tandem_kernels.rms_norm(xs, ws, 1e-5, xs)
        tandem_kernels.rotary(qs, qs, cs, ss)
        tandem_kernels.silu_and_mul(xs)
        tandem_kernels.store_kvcache(qs, qs, kc, vc, torch.tensor([0, 1, 2]))
        tandem_kernels.paged_decode_attention(qs, kc, vc, tables, lens, 0.1)

    run_all(torch.float32)
    assert calls == [
        "rms_norm",
        "rotary",
        "rotary",
        "silu_and_mul",
        "store_kvcache",
        "paged_decode_attention",
    ]
    calls.clear()
    # Attention the C++ op does not do is the reference's, not an error: a head size off its
    # 8-float vectors, 17 heads per KV head (with a whole cache: only the group is off), a cache
    # that is a strided view, int64 block tables or context lengths.
    for q_odd, kc_odd, tables_odd, lens_odd in (
        (torch.randn(3, 2, 36), _pages(4, 16, 2, 36)[0], tables, lens),
        (torch.randn(3, 17, 64), k_cache[:, :, :1].contiguous(), tables, lens),
        (q, k_cache[:, :, :1], tables, lens),
        (q, k_cache, tables.long(), lens),
        (q, k_cache, tables, lens.long()),
    ):
        got = tandem_kernels.paged_decode_attention(q_odd, kc_odd, kc_odd, tables_odd, lens_odd, 0.1)
        torch.testing.assert_close(
            got, reference.paged_decode_attention(q_odd, kc_odd, kc_odd, tables, lens, 0.1)
        )
    assert calls == []
    run_all(torch.bfloat16)  # float32 only
    monkeypatch.setenv("TANDEM_KERNELS", "torch")  # the references, forced
    run_all(torch.float32)
    assert calls == []
    assert tandem_kernels.cpu_ops_serve(torch.float32) is False
    monkeypatch.delenv("TANDEM_KERNELS")
    assert tandem_kernels.cpu_ops_serve(torch.float32) is True
    assert tandem_kernels.cpu_ops_serve(torch.bfloat16) is False


def test_without_the_cpp_ops_rms_norm_is_atens_and_the_reference_bit_for_bit(monkeypatch):
    # Where the ops cannot be built, the norm is ATen's fused one: the reference's arithmetic
    # exactly (the engine's outputs are compared with Hugging Face's token for token).
    monkeypatch.setattr(tandem_kernels.cpu_extension, "loaded", lambda: None)
    torch.manual_seed(0)
    for n in (64, 576, 4097):
        for t in (1, 128):
            x, res, w = torch.randn(t, n), torch.randn(t, n), torch.randn(n)
            assert torch.equal(tandem_kernels.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
            got, want = tandem_kernels.rms_norm(x, w, 1e-5, res), reference.rms_norm(x, w, 1e-5, res)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_lock_left_by_a_builder_that_died_does_not_hang_the_next_start():
    # torch's builder waits forever on its lock file, which only its own holder removes: a worker
    # killed mid-build left every later start hanging, even with the ops already built.
    folder = cpu_extension.build_dir()
    (folder / "lock").touch()
    code = "from tandem_kernels import cpu_extension as c; print(c.load() is not None)"
    env = {k: v for k, v in os.environ.items() if k != cpu_extension.PREBUILT_ENV}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240
        )
    except subprocess.TimeoutExpired:
        pytest.fail("loading the CPU ops hung on the stale lock")
    finally:
        (folder / "lock").unlink(missing_ok=True)
    assert done.stdout.strip() == "True", done.stderr
