"""The LoRA ops: references against a naive per-token float64 loop, Triton against the references.

A batch mixes adapters of different ranks with tokens of no adapter. Adapter weights past each
slot's rank hold NaN, so reading them shows up as NaN in the output; rows of x that belong to no
adapter hold inf, so reading those does too. Triton kernels run on CPU through TRITON_INTERPRET=1
(set in conftest.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import tandem_kernels
from tandem_kernels import lora_reference

from .conftest import BF16_DOT_BROKEN, requires_triton

# Largest |kernel - reference| over largest |reference|, per dtype.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}
LORA_ALPHA = 16.0


@dataclass(frozen=True)
class Adapters:
    lora_a: torch.Tensor  # [num_slots, max_rank, hidden_in], NaN past each rank
    lora_b: torch.Tensor  # [num_slots, hidden_out, max_rank], NaN past each rank
    ranks: torch.Tensor  # [num_slots] int32
    scaling: torch.Tensor  # [num_slots] float32


def make_adapters(
    ranks: list[int], hidden_in: int, hidden_out: int, dtype: torch.dtype, gen: torch.Generator
) -> Adapters:
    max_rank = max(ranks)
    lora_a = torch.full((len(ranks), max_rank, hidden_in), float("nan"))
    lora_b = torch.full((len(ranks), hidden_out, max_rank), float("nan"))
    for s, r in enumerate(ranks):
        lora_a[s, :r] = torch.randn(r, hidden_in, generator=gen) * hidden_in**-0.5
        lora_b[s, :, :r] = torch.randn(hidden_out, r, generator=gen) * r**-0.5
    scaling = torch.tensor([LORA_ALPHA / r for r in ranks], dtype=torch.float32)
    return Adapters(lora_a.to(dtype), lora_b.to(dtype), torch.tensor(ranks, dtype=torch.int32), scaling)


@dataclass(frozen=True)
class Batch:
    token_slots: list[int | None]  # per token, for the naive loops
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # token_indices, group_offsets, group_slots
    x: torch.Tensor  # [num_tokens, hidden_in], inf on tokens without an adapter


def make_batch(
    seq_lens: list[int], seq_slots: list[int | None], hidden_in: int, dtype: torch.dtype, gen: torch.Generator
) -> Batch:
    token_slots = [slot for n, slot in zip(seq_lens, seq_slots) for _ in range(n)]
    x = torch.randn(len(token_slots), hidden_in, generator=gen)
    x[[slot is None for slot in token_slots]] = float("inf")
    return Batch(token_slots, tandem_kernels.lora_token_groups(seq_lens, seq_slots), x.to(dtype))


def naive_shrink(x: torch.Tensor, ad: Adapters, token_slots: list[int | None]) -> torch.Tensor:
    y = torch.zeros(x.shape[0], ad.lora_a.shape[1], dtype=torch.float64)
    for t, slot in enumerate(token_slots):
        if slot is not None:
            r = int(ad.ranks[slot])
            y[t, :r] = ad.lora_a[slot, :r].double() @ x[t].double()
    return y


def naive_expand(
    y: torch.Tensor, ad: Adapters, token_slots: list[int | None], out: torch.Tensor, out_offset: int
) -> torch.Tensor:
    """out after the expand, in float64 (not rounded to out's dtype)."""
    hidden_out = ad.lora_b.shape[1]
    expected = out.double()
    for t, slot in enumerate(token_slots):
        if slot is not None:
            r = int(ad.ranks[slot])
            delta = ad.lora_b[slot, :, :r].double() @ y[t, :r].double()
            expected[t, out_offset : out_offset + hidden_out] += float(ad.scaling[slot]) * delta
    return expected


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """NaN (which fails every `<` check) when either side holds NaN."""
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max())


def make_out(num_tokens: int, width: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    # Small next to the LoRA delta, so comparing the whole output compares the delta.
    return (0.1 * torch.randn(num_tokens, width, generator=gen)).to(dtype)


# Four adapters of ranks 4, 8, 16 and 64 plus a rank that is no power of two, requests of 1 to 33
# tokens (decodes are length 1), tokens without an adapter between them, and adapters used by
# requests that are not adjacent (slot 4's two requests are one token apart).
RANKS = [4, 8, 16, 64, 12]
SEQ_LENS = [1, 7, 33, 1, 5, 2, 1, 17, 1, 2, 3]
SEQ_SLOTS = [0, None, 2, 3, 1, None, 0, 4, None, 4, 3]


@pytest.mark.parametrize(
    ("hidden_in", "hidden_out", "width", "out_offset"),
    [
        (576, 1536, 1536, 0),
        (576, 192, 576 + 2 * 192, 576 + 192),  # the v part of a fused qkv projection
        (4096, 576, 576, 0),
    ],
)
def test_reference_matches_naive(hidden_in, hidden_out, width, out_offset):
    gen = torch.Generator().manual_seed(0)
    ad = make_adapters(RANKS, hidden_in, hidden_out, torch.float32, gen)
    batch = make_batch(SEQ_LENS, SEQ_SLOTS, hidden_in, torch.float32, gen)
    y = lora_reference.lora_shrink(batch.x, ad.lora_a, ad.ranks, *batch.groups)
    assert y.shape == (len(batch.token_slots), max(RANKS)) and y.dtype == torch.float32
    assert rel_err(y, naive_shrink(batch.x, ad, batch.token_slots)) < 1e-5

    out = make_out(len(batch.token_slots), width, torch.float32, gen)
    expected = naive_expand(y, ad, batch.token_slots, out, out_offset)
    lora_reference.lora_expand(y, ad.lora_b, ad.ranks, *batch.groups, out, ad.scaling, out_offset)
    assert rel_err(out, expected) < 1e-5


def test_naive_comparison_catches_slot_scaling_offset_and_rank_bugs():
    # The checks above are only worth something if the usual mistakes move the output past tolerance.
    gen = torch.Generator().manual_seed(1)
    ad = make_adapters(RANKS, 64, 48, torch.float32, gen)
    batch = make_batch(SEQ_LENS, SEQ_SLOTS, 64, torch.float32, gen)
    token_indices, group_offsets, group_slots = batch.groups
    y = naive_shrink(batch.x, ad, batch.token_slots).float()
    out = make_out(len(batch.token_slots), 100, torch.float32, gen)
    expected = naive_expand(y, ad, batch.token_slots, out, 50)

    def expand(**changes) -> torch.Tensor:
        args = {
            "y": y,
            "lora_b": ad.lora_b,
            "ranks": ad.ranks,
            "token_indices": token_indices,
            "group_offsets": group_offsets,
            "group_slots": group_slots,
            "out": out.clone(),
            "scaling": ad.scaling,
            "out_offset": 50,
            **changes,
        }
        lora_reference.lora_expand(**args)
        return args["out"]

    assert rel_err(expand(), expected) < 1e-5
    shifted = group_offsets.clone()
    shifted[1] += 1  # the first token of group 1 goes to group 0's adapter
    bugs = {
        "wrong slot": expand(group_slots=(group_slots + 1) % len(RANKS)),
        "no scaling": expand(scaling=torch.ones_like(ad.scaling)),
        "wrong offset": expand(out_offset=49),
        "rank too large": expand(ranks=ad.ranks.clamp(max=max(RANKS) - 1) + 1),
        "token in the wrong group": expand(group_offsets=shifted),
    }
    for bug, result in bugs.items():
        assert not rel_err(result, expected) < 1e-2, bug
    wrong_slot_y = lora_reference.lora_shrink(
        batch.x, ad.lora_a, ad.ranks, token_indices, group_offsets, (group_slots + 1) % len(RANKS)
    )
    assert not rel_err(wrong_slot_y, y) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision(dtype):
    gen = torch.Generator().manual_seed(2)
    ad = make_adapters(RANKS, 128, 96, dtype, gen)
    batch = make_batch(SEQ_LENS, SEQ_SLOTS, 128, dtype, gen)
    y = lora_reference.lora_shrink(batch.x, ad.lora_a, ad.ranks, *batch.groups)
    assert y.dtype == torch.float32
    assert rel_err(y, naive_shrink(batch.x, ad, batch.token_slots)) < 1e-5  # products of exact values
    out = make_out(len(batch.token_slots), 96, dtype, gen)
    expected = naive_expand(y, ad, batch.token_slots, out, 0)
    lora_reference.lora_expand(y, ad.lora_b, ad.ranks, *batch.groups, out, ad.scaling)
    assert out.dtype == dtype
    assert rel_err(out, expected) < TOLERANCE[dtype]


def test_lora_token_groups():
    token_indices, group_offsets, group_slots = tandem_kernels.lora_token_groups(
        [2, 1, 3, 2], [1, None, 0, 1]
    )
    assert token_indices.tolist() == [3, 4, 5, 0, 1, 6, 7] and token_indices.dtype == torch.int64
    assert group_offsets.tolist() == [0, 3, 7] and group_offsets.dtype == torch.int32
    assert group_slots.tolist() == [0, 1] and group_slots.dtype == torch.int32
    token_indices, group_offsets, group_slots = tandem_kernels.lora_token_groups([4, 1], [None, None])
    assert (token_indices.numel(), group_offsets.tolist(), group_slots.numel()) == (0, [0], 0)
    with pytest.raises(ValueError, match="None for no adapter"):
        tandem_kernels.lora_token_groups([1], [-1])


def _ops(backend: str):
    if backend == "triton":
        from tandem_kernels.lora import lora_expand, lora_shrink

        return lora_shrink, lora_expand
    return lora_reference.lora_shrink, lora_reference.lora_expand


BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_without_adapter_are_untouched(backend):
    shrink, expand = _ops(backend)
    gen = torch.Generator().manual_seed(3)
    ad = make_adapters([8, 16], 32, 40, torch.float16, gen)
    batch = make_batch([3, 2, 1, 4], [1, None, 0, None], 32, torch.float16, gen)
    y = shrink(batch.x, ad.lora_a, ad.ranks, *batch.groups)
    has_adapter = torch.tensor([slot is not None for slot in batch.token_slots])
    assert torch.equal(y[~has_adapter], torch.zeros_like(y[~has_adapter]))  # x there is inf
    assert y[has_adapter].isfinite().all()
    out = make_out(len(batch.token_slots), 3 * 40, torch.float16, gen)
    before = out.clone()
    expand(y, ad.lora_b, ad.ranks, *batch.groups, out, ad.scaling, 40)
    assert torch.equal(out[~has_adapter], before[~has_adapter])
    assert torch.equal(out[:, :40], before[:, :40]) and torch.equal(out[:, 80:], before[:, 80:])
    assert not torch.equal(out[has_adapter, 40:80], before[has_adapter, 40:80])
    # A batch with no adapter at all: no groups, nothing to do.
    groups = tandem_kernels.lora_token_groups([5], [None])
    assert torch.equal(shrink(batch.x[:5], ad.lora_a, ad.ranks, *groups), torch.zeros(5, 16))
    after = out.clone()
    expand(y[:5], ad.lora_b, ad.ranks, *groups, out[:5], ad.scaling, 0)
    assert torch.equal(out, after)


@pytest.fixture
def triton_lora():
    """The Triton launchers, checked to run in the interpreter when there is no GPU."""
    from triton.runtime.interpreter import InterpretedFunction

    from tandem_kernels.lora import _lora_expand_kernel, _lora_shrink_kernel

    if not torch.cuda.is_available() and not all(
        isinstance(f, InterpretedFunction) for f in (_lora_shrink_kernel, _lora_expand_kernel)
    ):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU")
    return _ops("triton")


# (ranks, seq_lens, seq_slots, hidden_in, hidden_out, out width, out_offset, dtype)
TRITON_CASES = [
    # Hidden sizes that are no multiple of the kernels' tiles; the k part of a fused qkv output.
    (RANKS, SEQ_LENS, SEQ_SLOTS, 600, 200, 3 * 200, 200, torch.float32),
    ([16, 128, 4], [1, 1, 1, 2, 1], [1, 0, None, 1, 2], 4096, 1536, 1536, 0, torch.float32),  # decode
    ([4, 8, 16, 64], [20, 1, 7, 1], [3, 0, None, 2], 576, 1536, 1536, 0, torch.float16),
    pytest.param([8, 16], [5, 2, 3], [1, None, 0], 64, 64, 64, 0, torch.bfloat16, marks=BF16_DOT_BROKEN),
]


@requires_triton
@pytest.mark.parametrize(
    ("ranks", "seq_lens", "seq_slots", "hidden_in", "hidden_out", "width", "out_offset", "dtype"),
    TRITON_CASES,
)
def test_triton_matches_reference(
    triton_lora, ranks, seq_lens, seq_slots, hidden_in, hidden_out, width, out_offset, dtype
):
    shrink, expand = triton_lora
    gen = torch.Generator().manual_seed(4)
    ad = make_adapters(ranks, hidden_in, hidden_out, dtype, gen)
    batch = make_batch(seq_lens, seq_slots, hidden_in, dtype, gen)
    # x as a column slice of a wider tensor, as a fused projection would hand it over.
    x = torch.cat([batch.x, torch.randn(batch.x.shape[0], 8, generator=gen).to(dtype)], dim=1)[:, :hidden_in]
    y = shrink(x, ad.lora_a, ad.ranks, *batch.groups)
    y_ref = lora_reference.lora_shrink(x, ad.lora_a, ad.ranks, *batch.groups)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert rel_err(y, y_ref) < TOLERANCE[dtype]

    out = make_out(len(batch.token_slots), width, dtype, gen)
    out_ref = out.clone()
    expand(y_ref, ad.lora_b, ad.ranks, *batch.groups, out, ad.scaling, out_offset)
    lora_reference.lora_expand(y_ref, ad.lora_b, ad.ranks, *batch.groups, out_ref, ad.scaling, out_offset)
    assert rel_err(out, out_ref) < TOLERANCE[dtype]


@requires_triton
def test_triton_result_does_not_depend_on_the_batch(triton_lora):
    # A request alone and the same request batched with others get bit-identical results.
    shrink, expand = triton_lora
    gen = torch.Generator().manual_seed(5)
    ad = make_adapters([8, 16], 96, 80, torch.float32, gen)
    batch = make_batch([3, 19, 2], [1, 0, 1], 96, torch.float32, gen)
    alone = tandem_kernels.lora_token_groups([19], [0])
    y = shrink(batch.x, ad.lora_a, ad.ranks, *batch.groups)
    y_alone = shrink(batch.x[3:22], ad.lora_a, ad.ranks, *alone)
    assert torch.equal(y[3:22], y_alone)
    out = make_out(24, 80, torch.float32, gen)
    out_alone = out[3:22].clone()
    expand(y, ad.lora_b, ad.ranks, *batch.groups, out, ad.scaling)
    expand(y_alone, ad.lora_b, ad.ranks, *alone, out_alone, ad.scaling)
    assert torch.equal(out[3:22], out_alone)


@requires_triton
def test_triton_rejects_bad_inputs(triton_lora):
    shrink, expand = triton_lora
    gen = torch.Generator().manual_seed(6)
    ad = make_adapters([8], 32, 16, torch.float32, gen)
    batch = make_batch([4], [0], 32, torch.float32, gen)
    token_indices, group_offsets, group_slots = batch.groups
    with pytest.raises(AssertionError):
        shrink(batch.x, ad.lora_a, ad.ranks, token_indices.int(), group_offsets, group_slots)
    with pytest.raises(AssertionError, match="x rows must be contiguous"):
        shrink(batch.x.t().contiguous().t(), ad.lora_a, ad.ranks, *batch.groups)
    y = shrink(batch.x, ad.lora_a, ad.ranks, *batch.groups)
    with pytest.raises(AssertionError):  # the slice would run past out's last column
        expand(y, ad.lora_b, ad.ranks, *batch.groups, torch.zeros(4, 20), ad.scaling, 5)
    with pytest.raises(AssertionError, match="lora_b rows must be contiguous"):
        b = ad.lora_b.transpose(1, 2).contiguous().transpose(1, 2)
        expand(y, b, ad.ranks, *batch.groups, torch.zeros(4, 16), ad.scaling)


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("TANDEM_KERNELS", raising=False)

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton path must not run for CPU tensors")

    monkeypatch.setattr(tandem_kernels, "_triton_lora_shrink", no_triton)
    monkeypatch.setattr(tandem_kernels, "_triton_lora_expand", no_triton)
    gen = torch.Generator().manual_seed(7)
    ad = make_adapters([4, 8], 32, 24, torch.float32, gen)
    batch = make_batch([2, 3], [1, 0], 32, torch.float32, gen)
    y = tandem_kernels.lora_shrink(batch.x, ad.lora_a, ad.ranks, *batch.groups)
    assert torch.equal(y, lora_reference.lora_shrink(batch.x, ad.lora_a, ad.ranks, *batch.groups))
    out = make_out(5, 48, torch.float32, gen)
    expected = out.clone()
    tandem_kernels.lora_expand(y, ad.lora_b, ad.ranks, *batch.groups, out, ad.scaling, 24)
    lora_reference.lora_expand(y, ad.lora_b, ad.ranks, *batch.groups, expected, ad.scaling, 24)
    assert torch.equal(out, expected)


@requires_triton
def test_dispatcher_env_forces_triton(monkeypatch):
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    calls = []
    monkeypatch.setattr(tandem_kernels, "_triton_lora_shrink", lambda *args: calls.append("shrink"))
    monkeypatch.setattr(tandem_kernels, "_triton_lora_expand", lambda *args: calls.append("expand"))
    gen = torch.Generator().manual_seed(8)
    ad = make_adapters([4], 16, 16, torch.float32, gen)
    batch = make_batch([2], [0], 16, torch.float32, gen)
    tandem_kernels.lora_shrink(batch.x, ad.lora_a, ad.ranks, *batch.groups)
    tandem_kernels.lora_expand(torch.zeros(2, 4), ad.lora_b, ad.ranks, *batch.groups, batch.x, ad.scaling)
    assert calls == ["shrink", "expand"]
