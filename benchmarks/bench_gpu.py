"""The CUDA path, checked and measured on one GPU in one run (under 10 minutes on an H100).

Sections (each runs on its own; a failure is recorded and the next one goes on):
  ceilings   device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 matmul
  kernels    Triton kernels on CUDA against the torch references, on fresh random inputs
  attention  paged decode attention bandwidth (Llama-3-8B shapes) as a fraction of the copy
             bandwidth, against the torch reference kernel and PyTorch's own attention (SDPA);
             prefill after a cached prefix against the float32 reference and dense SDPA
  lora       LoRA shrink/expand time at rank 16, batch 64, as a fraction of the base projections
  lora_sweep the same for 13 launch settings of lora_apply, grouped and tiled, to pick the default
  lora_folded_sweep  the shrink folded into cuBLAS's GEMM (adapters' A rows appended to W), then one
             expand: padding of the appended rows and the expand's launch settings
  greedy     greedy outputs of the engine (bf16, CUDA graphs) against `transformers` generate on
             the same weights: 30 prompts x 32 tokens; each difference checked for a near-tie.
             The model is trained on the spot (memorizing random documents) so that its outputs
             are as decisive as a trained model's; `greedy_random` repeats it on random weights
  lora_decode  decode steps of 64 requests on 1 or 8 rank-16 adapters, replayed from the LoRA CUDA
             graphs (unfolded, and folded: the shrink inside the base GEMMs) against the same steps
             run eagerly and against no adapter (8 layers of the Llama-3-8B shape)
  llama8b    a Llama-3-8B-shaped model with random weights built on the device: prefill tokens/s
             and MFU for a 2K prompt, decode tokens/s at batch 1/16/64/256, each against
             `transformers` on the same weights
  kv         KV transfer device->device through the real gRPC path (KVStager, kv_chunks,
             KVWriter) on loopback, against raw pinned copies of the same bytes; the same
             prompt's layers split over 2/4/8 concurrent streams (does the connector scale?);
             where one stream's time goes: gRPC alone on the same messages, each side's KV work
             alone (staging and encoding; parsing and writing, checked byte for byte)
  sampling   a decode step's tokens sampled (top-p, top-k, temperature) from Llama-3's 128K
             vocabulary at batch 16/64/256 on the device, against transformers' warpers

There is no checkpoint to download: SmolLM2 and Llama-3-8B shapes with random weights (the
tokenizer files are only read, never used: prompts are token ids).

Run: make bench-gpu, or python benchmarks/bench_gpu.py [--tokenizer DIR] [--out DIR] [--sections a,b]
     [--quick]; --smoke runs the script on CPU with tiny shapes (a check of the script itself)
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS: dict[str, dict] = {}
STATE: dict[str, dict] = {}  # what a later section reuses (the trained model and its outputs)
DEV = "cuda"  # --smoke: "cpu", tiny shapes, Triton's interpreter: checks the script, not the GPU
SMOKE = False
SECTIONS: dict[str, object] = {}
ARGS: argparse.Namespace


def section(fn):
    SECTIONS[fn.__name__] = fn
    return fn


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sz(full, smoke):
    """The full-size value, or the tiny one of a --smoke run."""
    return smoke if SMOKE else full


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds per call, timed with CUDA events (triton.testing.do_bench)."""
    from triton.testing import do_bench

    if SMOKE:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graph_ms(fn, rep: int = 100) -> float:
    """Median ms per call of `fn` replayed from a CUDA graph: GPU time without launch gaps."""
    from triton.testing import do_bench_cudagraph

    if SMOKE:
        return bench_ms(fn)

    return float(do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max())


# ------------------------------------------------------------------------------------ ceilings


def _copy_ms(nbytes: int) -> float:
    x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=DEV)
    y = torch.empty_like(x)
    return bench_ms(lambda: y.copy_(x))


def _matmul_ms(n: int) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=DEV)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=DEV)
    return bench_ms(lambda: a @ b)


@section
def ceilings() -> dict:
    nbytes = sz(1 << 30, 1 << 20)
    copy_bw = 2 * nbytes / (_copy_ms(nbytes) * 1e-3)  # bytes read + bytes written
    n = sz(8192, 128)
    tflops = 2 * n**3 / (_matmul_ms(n) * 1e-3) / 1e12
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_bw / 1e9, "matmul_bf16_TFLOPs": tflops}


# ------------------------------------------------------------------------------------ kernels


def _paged(context_lens, num_kv_heads, head_dim, dtype, block_size=16, gen=None):
    pages = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(pages) + 8
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, dtype=dtype, device=DEV)
    v = torch.randn(shape, dtype=dtype, device=DEV)
    order = torch.randperm(num_blocks, device=DEV).to(torch.int32)
    tables = torch.zeros(len(context_lens), max(pages) + 1, dtype=torch.int32, device=DEV)
    used = 0
    for s, n in enumerate(pages):
        tables[s, :n] = order[used : used + n]
        used += n
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEV)
    return k, v, tables, lens


@section
def kernels() -> dict:
    import tandem_kernels
    from tandem_kernels import lora as lora_mod
    from tandem_kernels import lora_reference, reference
    from tandem_kernels.lora import lora_apply, lora_expand, lora_shrink
    from tandem_kernels.paged_decode_attention import paged_decode_attention
    from tandem_kernels.store_kvcache import store_kvcache

    assert tandem_kernels.uses_triton(torch.device(DEV))
    out: dict = {}
    tol = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}

    # store_kvcache: exact, padding slots (-1) untouched
    for dtype in (torch.bfloat16, torch.float32):
        t, h, d, bs, nb = 1000, 8, 128, 16, 100
        key = torch.randn(t, h, d, dtype=dtype, device=DEV)
        val = torch.randn(t, h, d, dtype=dtype, device=DEV)
        kc = torch.randn(nb, bs, h, d, dtype=dtype, device=DEV)
        vc = torch.randn_like(kc)
        slots = torch.randperm(nb * bs, device=DEV)[:t]
        slots[::7] = -1
        ek, ev = kc.cpu(), vc.cpu()
        reference.store_kvcache(key.cpu(), val.cpu(), ek, ev, slots.cpu())
        store_kvcache(key, val, kc, vc, slots)
        out[f"store_kvcache_{str(dtype)[6:]}_exact"] = bool(
            torch.equal(kc.cpu(), ek) and torch.equal(vc.cpu(), ev)
        )

    # paged decode attention: Llama-3-8B and SmolLM2 shapes, split and unsplit, several dtypes
    def lens(n: int, hi: int) -> list[int]:
        return [int(x) for x in torch.randint(1, sz(hi, 200), (sz(n, 3),))]

    cases = [
        ("8b_b64", lens(64, 4096), 32, 8, 128, torch.bfloat16, None),
        ("8b_b1_long", [sz(7999, 700)], 32, 8, 128, torch.bfloat16, None),
        ("8b_b256", lens(256, 1024), 32, 8, 128, torch.bfloat16, None),
        ("smol_fp32", lens(40, 3000), 9, 3, 64, torch.float32, None),
        ("smol_bf16_split64", lens(40, 3000), 9, 3, 64, torch.bfloat16, 64),
        ("fp16_g4", lens(33, 2000), 16, 4, 128, torch.float16, None),
    ]
    for name, lens, nh, nkv, hd, dtype, part in cases:
        k, v, tables, clens = _paged(lens, nkv, hd, dtype)
        q = torch.randn(len(lens), nh, hd, dtype=dtype, device=DEV)
        args = (q, k, v, tables, clens, hd**-0.5)
        got = paged_decode_attention(*args, partition_size=part)
        want = reference.paged_decode_attention(*args)
        err = rel_err(got, want)
        out[f"decode_{name}_relerr"] = err
        out[f"decode_{name}_ok"] = bool(err < tol[dtype] and torch.isfinite(got).all())

    # Prefill over cached KV (PyTorch's fused attention, bottom-right causal): cached prefixes,
    # a whole prompt and a one-token chunk packed together, against the float32 reference.
    from tandem_kernels.prefill_attention import paged_prefill_attention

    for dtype in (torch.bfloat16, torch.float16):
        q_lens = [sz(700, 7), sz(2048, 20), 1, sz(300, 3)]
        ctx = [sz(1500, 12), sz(2048, 20), 90, sz(4000, 30)]
        k, v, tables, clens = _paged(ctx, 8, 128, dtype)
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        q = torch.randn(cu[-1], 32, 128, dtype=dtype, device=DEV)
        got = paged_prefill_attention(q, k, v, tables, cu, ctx, 128**-0.5)
        want = reference.paged_prefill_attention(q, k, v, tables, torch.tensor(cu), clens, 128**-0.5)
        err = rel_err(got, want)
        out[f"prefill_cached_{str(dtype)[6:]}_relerr"] = err
        out[f"prefill_cached_{str(dtype)[6:]}_ok"] = bool(err < tol[dtype] and torch.isfinite(got).all())

    # LoRA shrink/expand, mixed ranks, bf16 pool (as in the engine: a view of the KV pool)
    for dtype in (torch.bfloat16, torch.float32):
        ranks = [8, 16, 32, 64, 128, 0]
        hin, hout = sz(4096, 128), sz(6144, 192)
        offs, pos = [], 0
        for r in ranks:
            offs.append((pos, pos + r * hin))
            pos += r * hin + hout * r
        pool = (torch.randn(pos + 64, device=DEV) * 0.02).to(dtype)
        a_off = torch.tensor([o[0] for o in offs], dtype=torch.int64, device=DEV)
        b_off = torch.tensor([o[1] for o in offs], dtype=torch.int64, device=DEV)
        rk = torch.tensor(ranks, dtype=torch.int32, device=DEV)
        scaling = torch.tensor([2.0 / max(r, 1) for r in ranks], dtype=torch.float32, device=DEV)
        seq_lens = [1] * 48 + [37, 100, 5]
        seq_slots = [i % 7 if i % 7 < 6 else None for i in range(len(seq_lens))]
        groups = lora_reference.lora_token_groups(seq_lens, seq_slots, device=DEV)
        x = torch.randn(sum(seq_lens), hin, dtype=dtype, device=DEV)
        y = lora_shrink(x, pool, a_off, rk, *groups, 128)
        y_ref = lora_reference.lora_shrink(x, pool, a_off, rk, *groups, 128)
        # Zero outputs: the delta itself is compared, not drowned in the rounding of a base value.
        o1 = torch.zeros(sum(seq_lens), hout, dtype=dtype, device=DEV)
        o2 = o1.clone()
        lora_expand(y, pool, b_off, rk, *groups, o1, scaling, 0, hout)
        lora_reference.lora_expand(y_ref, pool, b_off, rk, *groups, o2, scaling, 0, hout)
        e_shrink = rel_err(y, y_ref)
        e_expand = rel_err(o1, o2)
        no_adapter = torch.tensor([s is None for s in seq_slots]).repeat_interleave(torch.tensor(seq_lens))
        untouched = bool((o1[no_adapter.to(DEV)] == 0).all())
        name = str(dtype)[6:]
        out[f"lora_shrink_{name}_relerr"] = e_shrink
        out[f"lora_expand_{name}_relerr"] = e_expand
        out[f"lora_{name}_ok"] = bool(e_shrink < tol[dtype] and e_expand < tol[dtype] and untouched)
        # lora_apply, grouped and tiled (metadata padded as the decode graphs pad it), partials
        # poisoned with NaN: against the reference's shrink + expand (o2).
        lora_mod._PARTIALS_FILL = float("nan")
        try:
            tables = (b_off[None], rk[None], torch.zeros_like(b_off)[None], scaling[None], ((0, hout),))
            rows = groups[0].shape[0]
            pad = 37
            padded = (
                torch.cat([groups[0], groups[0][:1].expand(pad)]),
                torch.cat([groups[1], groups[1][-1:].expand(pad)]),
                torch.cat([groups[2], groups[2][:1].expand(pad)]),
            )
            for layout, grp, tiles in (
                ("grouped", groups, None),
                ("tiled", groups, lora_reference.lora_token_tiles(groups[1], rows, device=DEV)),
                ("tiled_padded", padded, lora_reference.lora_token_tiles(padded[1], rows + pad, device=DEV)),
            ):
                o3 = torch.zeros_like(o1)
                lora_apply(x, pool, a_off, rk, *grp, 128, o3, *tables, tiles)
                err = rel_err(o3, o2)
                out[f"lora_apply_{layout}_{name}_relerr"] = err
                out[f"lora_apply_{layout}_{name}_ok"] = bool(
                    err < tol[dtype] and (o3[no_adapter.to(DEV)] == 0).all()
                )
        finally:
            lora_mod._PARTIALS_FILL = None
    return out


def _agreement(pairs) -> dict:
    """Kernel outputs against the reference's: the largest difference relative to the tensor's
    largest value (one bf16 unit is 2**-8 of a value), and the fraction of bit-identical elements."""
    pairs = list(pairs)
    return {
        "relerr": max(rel_err(a, b) for a, b in pairs),
        "exact": min(float((a == b).float().mean()) for a, b in pairs),
    }


def _fused_case(t: int, gen: torch.Generator) -> dict:
    from tandem_kernels import fused_ops as fused
    from tandem_kernels import reference

    hidden, heads, kv_heads, dim, inter = sz(4096, 128), 32, 8, 128, sz(14336, 256)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=DEV) * scale).to(torch.bfloat16)

    x, res, w = rnd(t, hidden), rnd(t, hidden, scale=4), 1 + rnd(hidden, scale=0.1)
    qkv = rnd(t, (heads + 2 * kv_heads) * dim, scale=3)
    q = qkv[:, : heads * dim].view(t, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(t, kv_heads, dim)
    angles = torch.rand(t, 1, dim // 2, generator=gen, device=DEV) * 4000
    cos = torch.cat([angles.cos()] * 2, -1).bfloat16()
    sin = torch.cat([angles.sin()] * 2, -1).bfloat16()
    gate_up = rnd(t, 2 * inter, scale=4)
    row: dict = {
        "rms_norm": _agreement(zip(fused.rms_norm(x, w, 1e-5, res), reference.rms_norm(x, w, 1e-5, res))),
        "rotary": _agreement(zip(fused.rotary(q, k, cos, sin), reference.rotary(q, k, cos, sin))),
        "silu_and_mul": _agreement([(fused.silu_and_mul(gate_up), reference.silu_and_mul(gate_up))]),
    }

    def layer(ops) -> None:
        ops.rms_norm(x, w, 1e-5, res)
        ops.rotary(q, k, cos, sin)
        ops.rms_norm(x, w, 1e-5, res)
        ops.silu_and_mul(gate_up)

    row["layer_fused_us"] = 1e3 * graph_ms(lambda: layer(fused))
    row["layer_torch_us"] = 1e3 * graph_ms(lambda: layer(reference))
    row["speedup"] = row["layer_torch_us"] / row["layer_fused_us"]
    row["per_step_saved_ms_32_layers"] = 32 * (row["layer_torch_us"] - row["layer_fused_us"]) / 1e3
    return row


@section
def fused_ops() -> dict:
    """A layer's elementwise work (two RMSNorms with their residual adds, rotary, SiLU-and-mul) as
    Tandem's four Triton kernels against the torch ops the model ran before, at Llama-3-8B's
    shapes: results (units in the last place of bf16, against the reference) and GPU time per
    layer, each replayed from a CUDA graph (so launch gaps do not count, as in the decode graphs)."""
    out: dict = {}
    gen = torch.Generator(device=DEV).manual_seed(11)
    for t in sz((1, 64, 256), (1, 3)):
        out[f"t{t}"] = row = _fused_case(t, gen)
        log(f"  fused ops, {t} tokens: {row}")
    ops = ("rms_norm", "rotary", "silu_and_mul")
    # Rounding as the torch ops round: at most one bf16 unit apart, and almost everywhere equal.
    out["ok"] = all(r[op]["relerr"] <= 2**-8 and r[op]["exact"] > 0.95 for r in out.values() for op in ops)
    return out


# ------------------------------------------------------------------------------------ attention


def _attention_case(batch: int, ctx: int, copy_bw: float | None) -> dict:
    from tandem_kernels import reference
    from tandem_kernels.paged_decode_attention import paged_decode_attention

    nh, nkv, hd = 32, 8, 128
    k, v, tables, lens = _paged([ctx] * batch, nkv, hd, torch.bfloat16)
    q = torch.randn(batch, nh, hd, dtype=torch.bfloat16, device=DEV)
    scale = hd**-0.5
    moved = 2 * batch * ctx * nkv * hd * 2 + 2 * q.nbytes  # KV read, q read, out written
    t = bench_ms(lambda: paged_decode_attention(q, k, v, tables, lens, scale))
    row = {"triton_ms": t, "triton_GBps": moved / (t * 1e-3) / 1e9}
    if copy_bw:
        row["fraction_of_copy_bw"] = row["triton_GBps"] / copy_bw
    # PyTorch's own attention over the same KV laid out densely (no paging): the SDPA kernels
    kd = k.view(-1, nkv, hd)[: batch * ctx].view(batch, ctx, nkv, hd).transpose(1, 2).contiguous()
    vd = v.view(-1, nkv, hd)[: batch * ctx].view(batch, ctx, nkv, hd).transpose(1, 2).contiguous()
    qd = q.view(batch, nh, 1, hd)
    t_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=scale, enable_gqa=True))
    row["sdpa_dense_ms"] = t_sdpa
    row["sdpa_dense_GBps"] = moved / (t_sdpa * 1e-3) / 1e9
    if batch * ctx <= 64 * 2048:
        ref = lambda: reference.paged_decode_attention(q, k, v, tables, lens, scale)  # noqa: E731
        row["torch_reference_ms"] = bench_ms(ref, warmup=5, rep=20)
    return row


def _prefill_case(q_len: int, ctx: int) -> dict:
    """A chunk of q_len queries after ctx - q_len cached positions, Llama-3-8B heads: the engine's
    path over the pages, the float32 reference it replaced, and SDPA on the same KV laid out densely."""
    from torch.nn.attention.bias import causal_lower_right

    from tandem_kernels import reference
    from tandem_kernels.prefill_attention import paged_prefill_attention

    nh, nkv, hd = 32, 8, 128
    k, v, tables, lens = _paged([ctx], nkv, hd, torch.bfloat16)
    q = torch.randn(q_len, nh, hd, dtype=torch.bfloat16, device=DEV)
    scale, cu = hd**-0.5, [0, q_len]
    # Scores below the diagonal only: q_len * (ctx - q_len / 2) per head, two matmuls.
    flops = 4 * nh * hd * q_len * (ctx - q_len / 2)
    t = bench_ms(lambda: paged_prefill_attention(q, k, v, tables, cu, [ctx], scale))
    row = {"fused_ms": t, "fused_TFLOPs": flops / (t * 1e-3) / 1e12}
    ref = lambda: reference.paged_prefill_attention(q, k, v, tables, torch.tensor(cu), lens, scale)  # noqa: E731
    row["torch_reference_ms"] = bench_ms(ref, warmup=3, rep=10)
    row["speedup_vs_reference"] = row["torch_reference_ms"] / t
    kd = k.view(-1, nkv, hd)[:ctx].transpose(0, 1)[None].contiguous()
    vd = v.view(-1, nkv, hd)[:ctx].transpose(0, 1)[None].contiguous()
    qd = q.transpose(0, 1)[None]
    bias = causal_lower_right(q_len, ctx)
    dense = lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=bias, scale=scale, enable_gqa=True)  # noqa: E731
    row["sdpa_dense_ms"] = bench_ms(dense)
    row["fraction_of_dense"] = row["sdpa_dense_ms"] / t
    return row


@section
def attention() -> dict:
    copy_bw = RESULTS.get("ceilings", {}).get("copy_GBps")
    out: dict = {}
    for batch, ctx in sz(((64, 2048), (256, 1024), (16, 4096), (1, 8192)), ((2, 64),)):
        out[f"b{batch}_ctx{ctx}"] = _attention_case(batch, ctx, copy_bw)
        torch.cuda.empty_cache()
    # Prefill after a cached prefix (a shared system prompt; a long prompt's second chunk).
    for q_len, ctx in sz(((2048, 4096), (512, 8192)), ((16, 48),)):
        out[f"prefill_q{q_len}_ctx{ctx}"] = _prefill_case(q_len, ctx)
        torch.cuda.empty_cache()
    return out


def _partition_case(batch: int, ctx: int, width: int, copy_bw: float | None, sms: int) -> dict:
    from tandem_kernels.paged_decode_attention import adaptive_partition, paged_decode_attention

    nh, nkv, hd = 32, 8, 128
    k, v, tables, lens = _paged([ctx] * batch, nkv, hd, torch.bfloat16)
    if width:
        pad = tables[:, :1].expand(batch, width // 16 - tables.shape[1])
        tables = torch.cat([tables, pad], dim=1).contiguous()
    q = torch.randn(batch, nh, hd, dtype=torch.bfloat16, device=DEV)
    scale, moved = hd**-0.5, 2 * batch * ctx * nkv * hd * 2 + 2 * q.nbytes
    row: dict = {"adaptive_partition": adaptive_partition(batch * nkv, tables.shape[1] * 16, sms)}
    for name, size in (("default", None), *((f"p{p}", p) for p in sz((64, 128, 256, 512, 1024), (64,)))):
        t = bench_ms(lambda size=size: paged_decode_attention(q, k, v, tables, lens, scale, size))
        row[f"{name}_us"] = 1e3 * t
        if copy_bw:
            row[f"{name}_fraction"] = moved / (t * 1e-3) / 1e9 / copy_bw
    qd = q.view(batch, nh, 1, hd)
    kd = k.view(-1, nkv, hd)[: batch * ctx].view(batch, ctx, nkv, hd).transpose(1, 2).contiguous()
    vd = v.view(-1, nkv, hd)[: batch * ctx].view(batch, ctx, nkv, hd).transpose(1, 2).contiguous()
    sdpa = lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=scale, enable_gqa=True)  # noqa: E731
    row["sdpa_dense_us"] = 1e3 * bench_ms(sdpa)
    return row


@section
def attention_partitions() -> dict:
    """Decode attention's split-K partition size, swept where few (sequence, kv head) pairs leave
    SMs idle: the default (512 tokens when it splits), fixed sizes, and `adaptive_partition`'s
    choice. "w": a block table wider than the context, as a CUDA graph's (max_model_len 32K):
    the partitions past the context return at once, but the combine reads their slots."""
    from tandem_kernels.paged_decode_attention import _num_sms

    copy_bw = RESULTS.get("ceilings", {}).get("copy_GBps")
    sms = _num_sms(torch.cuda.current_device()) if DEV == "cuda" else 4
    cases = sz(
        ((1, 8192, 0), (1, 2048, 0), (1, 2048, 32768), (4, 8192, 0), (16, 4096, 0), (64, 2048, 0)),
        ((1, 256, 0), (1, 128, 512)),
    )
    out: dict = {}
    for batch, ctx, width in cases:
        key = f"b{batch}_ctx{ctx}" + (f"_w{width}" if width else "")
        out[key] = _partition_case(batch, ctx, width, copy_bw, sms)
        log(f"  {key}: {out[key]}")
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------ lora


def _lora_setup(kind: str, num_adapters: int, rank: int = 16, batch: int = 64, pad: int = 0) -> dict:
    """One projection's base GEMM and its LoRA calls at these shapes, as closures on shared tensors:
    base, per_op (a shrink, then an expand per part), fused (lora_apply, the engine's eager call),
    tiled (the decode graphs' call: tiled launch, shrink sized for rank 64) and tiled_exact; and the
    whole projection as the engine runs it (`LoRABatch.project`: the shrink on a side stream beside
    the base GEMM, then the expand), grouped and tiled, against `sequential` (base, then fused);
    and `folded`: the shrink folded into cuBLAS's GEMM (each adapter's stacked A appended to W as
    extra output rows, padded with zero rows to a multiple of `pad`), then one expand launch
    (tandem_kernels.lora_apply_finish) reading y from those columns, into `folded_out`."""
    import tandem_kernels
    from tandem_kernels import lora_reference
    from tandem_kernels.lora import lora_apply, lora_expand, lora_shrink
    from tandem_worker.engine.lora import LoRABatch

    hin, parts = _lora_projections()[kind]

    dtype = torch.bfloat16
    hout = sum(parts)
    w = torch.randn(hout, hin, dtype=dtype, device=DEV) * hin**-0.5
    x = torch.randn(batch, hin, dtype=dtype, device=DEV)
    o = torch.zeros(batch, hout, dtype=dtype, device=DEV)
    # Each adapter: the A rows of every part stacked ([len(parts) * rank, hin]), then B per part.
    n_parts = len(parts)
    per_adapter = n_parts * rank * hin + hout * rank
    pool = (torch.randn(num_adapters * per_adapter, device=DEV) * 0.02).to(dtype)
    a_off = torch.tensor([i * per_adapter for i in range(num_adapters)], dtype=torch.int64, device=DEV)
    ranks_shrink = torch.full((num_adapters,), n_parts * rank, dtype=torch.int32, device=DEV)
    ranks_part = torch.full((num_adapters,), rank, dtype=torch.int32, device=DEV)
    scaling = torch.full((num_adapters,), 2.0, dtype=torch.float32, device=DEV)
    expands = []
    col = 0
    for j, width in enumerate(parts):
        b_off = [i * per_adapter + n_parts * rank * hin + col * rank for i in range(num_adapters)]
        expands.append(
            (
                torch.tensor(b_off, dtype=torch.int64, device=DEV),
                torch.full((num_adapters,), j * rank, dtype=torch.int64, device=DEV),
                col,
                width,
            )
        )
        col += width
    slots = [i % num_adapters for i in range(batch)]
    groups = lora_reference.lora_token_groups([1] * batch, slots, device=DEV)
    b_table = torch.stack([e[0] for e in expands])
    y_table = torch.stack([e[1] for e in expands])
    r_table = ranks_part.expand(n_parts, -1).contiguous()
    s_table = scaling.expand(n_parts, -1).contiguous()
    tables = (b_table, r_table, y_table, s_table, tuple((c, width) for _, _, c, width in expands))
    # The batch is all adapter tokens here, so nothing is padded.
    tiles = lora_reference.lora_token_tiles(groups[1], batch, device=DEV)

    def per_op() -> None:  # a shrink, then an expand per part
        y = lora_shrink(x, pool, a_off, ranks_shrink, *groups, n_parts * rank)
        for b_off, y_off, c, width in expands:
            lora_expand(y, pool, b_off, ranks_part, *groups, o, scaling, c, width, y_off)

    def apply(max_rank: int, tiles: torch.Tensor | None = None):
        return lambda: lora_apply(x, pool, a_off, ranks_shrink, *groups, max_rank, o, *tables, tiles)

    def base() -> torch.Tensor:
        return torch.matmul(x, w.t(), out=o)

    fused = apply(n_parts * rank)

    def sequential() -> None:
        base()
        fused()

    side = torch.cuda.Stream() if DEV == "cuda" else None
    lora_tables = {"fused": {kind: [(a_off, ranks_shrink, b_table, r_table, y_table, s_table)]}}
    shapes = _lora_shapes()

    def engine_batch(tiles: torch.Tensor | None) -> LoRABatch:
        max_rank = {k: n_parts * rank if k == kind else 0 for k in _lora_projections()}
        return LoRABatch(pool, lora_tables, groups, max_rank, shapes, tiles=tiles, stream=side)

    grouped_batch, tiled_batch = engine_batch(None), engine_batch(tiles)

    stacked = n_parts * rank
    a_rows = [pool[int(a_off[i]) :][: stacked * hin].view(stacked, hin) for i in range(num_adapters)]
    w_cat = torch.cat([w, *a_rows])
    if pad:  # zero rows up to a multiple of `pad`: cuBLAS may pick other tiles for odd widths
        w_cat = torch.cat([w_cat, w_cat.new_zeros(-w_cat.shape[0] % pad, hin)])
    wide = torch.empty(batch, w_cat.shape[0], dtype=dtype, device=DEV)
    folded_out = wide[:, :hout]  # the projection's output: a view with the wide row stride
    bases = torch.arange(num_adapters, device=DEV) * stacked  # slot i's columns of the extra ones
    folded_tables = (b_table, r_table, y_table + bases, s_table, tables[4])
    folded_total = (bases + stacked).to(torch.int32)

    def folded() -> None:
        torch.matmul(x, w_cat.t(), out=wide)
        y = wide[:, hout:]
        tandem_kernels.lora_apply_finish(
            y,
            pool,
            folded_total,
            *groups,
            num_adapters * stacked,
            folded_out,
            *folded_tables,
            max_part_rank=rank,
        )

    return {
        "folded": folded,
        "folded_out": folded_out,
        "out": o,
        "base": base,
        "per_op": per_op,
        "fused": fused,
        "tiled": apply(n_parts * 64, tiles),
        "tiled_exact": apply(n_parts * rank, tiles),
        "sequential": sequential,
        "project": lambda: grouped_batch.project(0, kind, x, lambda _: base()),
        "project_tiled": lambda: tiled_batch.project(0, kind, x, lambda _: base()),
    }


def _lora_case(kind: str, num_adapters: int) -> dict:
    case = _lora_setup(kind, num_adapters)
    row = {
        "base_ms": bench_ms(case["base"]),
        "lora_ms": bench_ms(case["fused"]),
        "base_graph_ms": graph_ms(case["base"]),
        "lora_graph_ms": graph_ms(case["fused"]),
        "per_op_graph_ms": graph_ms(case["per_op"]),
        "tiled_graph_ms": graph_ms(case["tiled"]),
        "tiled_exact_graph_ms": graph_ms(case["tiled_exact"]),
        "sequential_graph_ms": graph_ms(case["sequential"]),
        "project_graph_ms": graph_ms(case["project"]),
        "project_tiled_graph_ms": graph_ms(case["project_tiled"]),
        "folded_graph_ms": graph_ms(case["folded"]),
    }
    row["fraction_graph"] = row["lora_graph_ms"] / row["base_graph_ms"]
    # The tiled launch and the engine's project give the grouped launch's result (fresh outputs).
    o = case["out"]
    o.zero_()
    case["fused"]()
    grouped_out = o.clone()
    o.zero_()
    case["tiled"]()
    row["tiled_rel_err"] = rel_err(o, grouped_out)
    case["sequential"]()
    expected = o.clone()
    for launch in ("project", "project_tiled"):
        o.zero_()
        case[launch]()
        row[f"{launch}_rel_err"] = rel_err(o, expected)
    case["folded"]()
    row["folded_rel_err"] = rel_err(case["folded_out"], expected)
    return row


def _lora_shapes() -> dict[str, tuple[int, int]]:
    """(in, out) of every projection LoRA targets in the benchmarks' model (Llama-3-8B; tiny in smoke)."""
    from tandem_worker.engine.config import ModelConfig
    from tandem_worker.engine.lora import module_shapes

    return module_shapes(ModelConfig.from_dict(sz(LLAMA3_8B, TINY_LLAMA)))


def _lora_projections() -> dict[str, tuple[int, list[int]]]:
    """The engine's four LoRA projections (fused qkv and gate_up): name -> (hidden_in, part widths)."""
    from tandem_worker.engine.lora import KINDS

    shapes = _lora_shapes()
    return {kind: (shapes[parts[0]][0], [shapes[m][1] for m in parts]) for kind, parts in KINDS.items()}


@section
def lora() -> dict:
    """Llama-3-8B projections at batch 64, rank 16: LoRA kernels (one shrink per fused projection,
    one expand for its parts) against the base GEMMs, for 1, 8 and 64 distinct adapters in the
    batch; and the time LoRA adds to the base projections when its shrinks run beside the GEMMs
    on a side stream, as the engine runs them (added_project), or after them (added_sequential)."""
    projections = _lora_projections()
    out: dict = {}
    for num_adapters in sz((1, 8, 64), (2,)):
        rows = {name: _lora_case(name, num_adapters) for name in projections}
        out.update({f"{num_adapters}ad_{name}": row for name, row in rows.items()})
        keys = [k for k in next(iter(rows.values())) if k.endswith("_ms")]
        total = {key: sum(r[key] for r in rows.values()) for key in keys}
        base = total["base_graph_ms"]
        out[f"{num_adapters}ad_layer"] = {
            **total,
            "fraction_eager": total["lora_ms"] / total["base_ms"],
            "fraction_graph": total["lora_graph_ms"] / base,
            "fraction_tiled_graph": total["tiled_graph_ms"] / base,
            "fraction_tiled_exact_graph": total["tiled_exact_graph_ms"] / base,
            # What LoRA adds to the base projections as the engine runs it, shrinks overlapped.
            "added_sequential": total["sequential_graph_ms"] / base - 1,
            "added_project": total["project_graph_ms"] / base - 1,
            "added_project_tiled": total["project_tiled_graph_ms"] / base - 1,
            # The shrink folded into the base GEMM, then one expand (lora_apply_finish).
            "fraction_folded": total["folded_graph_ms"] / base - 1,
            "max_rel_err": max(r[k] for r in rows.values() for k in r if k.endswith("rel_err")),
        }
        torch.cuda.empty_cache()
    return out


@section
def lora_sweep() -> dict:
    """lora_apply's launch settings (`tandem_kernels.lora.ApplyConfig`: split-K chunk, output columns
    and, tiled, programs per tile) swept at rank 16, batch 64, 1, 8 and 64 adapters, grouped (eager) and tiled
    (decode graphs) launches, inside CUDA graphs: per projection and per layer, as a fraction of
    the base projections, to pick APPLY_CONFIG from (per projection, if they disagree)."""
    from tandem_kernels import lora

    default = lora.APPLY_CONFIG
    configs = [
        lora.ApplyConfig(shrink_k_chunk=chunk, shrink_block_k=128, expand_block_n=block_n)
        for chunk in (512, 1024, 2048)
        for block_n in (64, 128, 256)
    ] + [
        lora.ApplyConfig(num_warps=8),
        lora.ApplyConfig(shrink_k_chunk=256, shrink_block_k=64),
        # The tiled launch's programs per tile (the grouped launch ignores it).
        lora.ApplyConfig(tile_group_programs=1),
        lora.ApplyConfig(tile_group_programs=16),
    ]
    if SMOKE:
        configs = configs[:1] + configs[-2:]
    out: dict = {"default": repr(default)}
    try:
        for num_adapters in sz((1, 8, 64), (2,)):
            base_layer = 0.0
            layer: dict[str, float] = {}
            for name in _lora_projections():
                case = _lora_setup(name, num_adapters)
                base = graph_ms(case["base"])
                base_layer += base
                rows = {}
                for c in configs:
                    lora.APPLY_CONFIG = c
                    key = (
                        f"k{c.shrink_k_chunk}/{c.shrink_block_k}_n{c.expand_block_n}_w{c.num_warps}"
                        f"_p{c.tile_group_programs}"
                    )
                    for launch in ("fused", "tiled_exact"):
                        case[launch]()  # compiles these settings' kernels before any capture
                        ms = graph_ms(case[launch], rep=30)
                        rows[f"{launch}:{key}"] = ms / base
                        layer[f"{launch}:{key}"] = layer.get(f"{launch}:{key}", 0.0) + ms
                    lora.APPLY_CONFIG = default
                best = min(rows, key=rows.get)
                out[f"{num_adapters}ad_{name}"] = {"best": best, "best_fraction": rows[best], **rows}
                del case
            fractions = {k: ms / base_layer for k, ms in layer.items()}
            best = {
                launch: min((k for k in fractions if k.startswith(launch)), key=fractions.get)
                for launch in ("fused", "tiled_exact")
            }
            out[f"{num_adapters}ad_layer"] = {
                "best": {k: (v, fractions[v]) for k, v in best.items()},
                **fractions,
            }
            log(f"  {num_adapters} adapters, best per layer: {out[f'{num_adapters}ad_layer']['best']}")
    finally:
        lora.APPLY_CONFIG = default
    return out


@section
def lora_folded_sweep() -> dict:
    """The shrink folded into cuBLAS's GEMM (each adapter's stacked A appended to W), then one expand
    launch: per layer, LoRA's fraction of the base GEMMs at rank 16, batch 64, 1 and 8 adapters,
    for W's appended rows padded to a multiple of 0 (none) / 64 / 128 / 256 and the expand's
    column tile and warps (tandem_kernels.lora.ApplyConfig)."""
    from tandem_kernels import lora

    default = lora.APPLY_CONFIG
    configs = [lora.ApplyConfig(expand_block_n=n, num_warps=w) for n in (64, 128, 256) for w in (4, 8)]
    out: dict = {}
    try:
        for num_adapters in sz((1, 8), (2,)):
            base = 0.0
            layer: dict[str, float] = {}
            for name in _lora_projections():
                for pad in sz((0, 64, 128, 256), (0, 64)):
                    case = _lora_setup(name, num_adapters, pad=pad)
                    if pad == 0:
                        base += graph_ms(case["base"])
                    for c in configs:
                        lora.APPLY_CONFIG = c
                        case["folded"]()  # compiles before any capture
                        key = f"pad{pad}_n{c.expand_block_n}_w{c.num_warps}"
                        layer[key] = layer.get(key, 0.0) + graph_ms(case["folded"], rep=30)
                    lora.APPLY_CONFIG = default
                    del case
            fractions = {k: v / base - 1 for k, v in layer.items()}
            best = min(fractions, key=fractions.get)
            out[f"{num_adapters}ad_layer"] = {"best": best, "best_fraction": fractions[best], **fractions}
            log(f"  {num_adapters} adapters, best: {best} {fractions[best]:.3f}")
    finally:
        lora.APPLY_CONFIG = default
    return out


# ------------------------------------------------------------------------------------ models


SMOL = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
TINY_LLAMA = {
    **SMOL,
    "vocab_size": 1000,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
}
LLAMA3_8B = {
    **SMOL,
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rope_theta": 500000.0,
}


def copy_tokenizer(folder: Path) -> None:
    """The tokenizer files beside a model's weights. Checked here, where each section that serves a
    model starts, not where the engine loads it after minutes of training or timing."""
    if not (Path(ARGS.tokenizer) / "tokenizer.json").is_file():
        raise RuntimeError(f"no tokenizer.json in {ARGS.tokenizer} (run `make gpu-kit` here first)")
    for f in Path(ARGS.tokenizer).glob("tokenizer*"):
        shutil.copy(f, folder / f.name)


def model_folder(cfg: dict) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
    (folder / "config.json").write_text(json.dumps(cfg))
    copy_tokenizer(folder)
    return folder


def hf_model(folder: Path, dtype: torch.dtype):
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEV):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as ignore_eos does
    model.generation_config.pad_token_id = 0
    return model


def engine_for(folder: Path, hf, **kw):
    from tandem_worker.engine.config import EngineConfig
    from tandem_worker.engine.llm_engine import LLMEngine

    cfg = EngineConfig(
        model=str(folder),
        device=DEV,
        dtype="bfloat16",
        load_format="dummy",
        detokenize=False,
        enable_prefix_caching=False,
        **kw,
    )
    engine = LLMEngine(cfg)
    # The same weights as the transformers model (copied in place: captured graphs stay valid).
    engine.runner.model.load_state(hf.state_dict().items(), source="transformers model")
    return engine


def run_engine(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from tandem_worker.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(prompt_token_ids=p, params=params) for p in prompts]
    done: dict[str, list[int]] = {}
    while engine.num_unfinished:
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.token_ids
    return [done[i] for i in ids]


def time_decode_steps(engine, batch: int, steps: int, warm: int, tokens: dict | None = None) -> float:
    """Seconds of `steps` engine steps once all `batch` queued requests have their first token
    and `warm` more steps ran (none of that timed); the requests then run to their end. `tokens`:
    filled with each request's generated ids, by request id."""

    def step() -> list:
        outputs = engine.step()
        if tokens is not None:
            for o in outputs:
                if o.finished:
                    tokens[o.request_id] = list(o.token_ids)
        return outputs

    produced = 0
    while produced < batch:
        produced += sum(1 for o in step() if len(o.token_ids) == 1)
    for _ in range(warm):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    while engine.num_unfinished:
        step()
    return elapsed


@torch.inference_mode()
def hf_generate(model, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt], device=DEV)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
    return out[0, len(prompt) :].tolist()


def _bf16_ulp(x: float) -> float:
    """The spacing of bfloat16 values (8 significant bits) around x."""
    return 2.0 ** (math.floor(math.log2(max(abs(x), 1e-30))) - 7)


def _greedy_check(folder: Path, hf32, prompts: list[list[int]], new: int, keep: dict | None = None) -> dict:
    """Greedy tokens of the engine (bf16, CUDA graphs, one batch) against transformers generate
    (bf16, one prompt at a time) on the same weights; each first difference is looked up in the
    float32 model: a near-tie is a gap within two bf16 steps of the top logit."""
    import copy

    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    engine = engine_for(folder, hf16, kv_cache_bytes=1 << 30, cuda_graph_max_batch=32, max_num_seqs=32)
    t0 = time.perf_counter()
    ours = run_engine(engine, prompts, new)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = [hf_generate(hf16, p, new) for p in prompts]
    t_hf = time.perf_counter() - t0
    # The same prompts one at a time, eagerly (no CUDA graph): batching must not change a result.
    engine.runner.graphs = None
    single = [run_engine(engine, [p], new)[0] for p in prompts[:8]]
    if keep is not None:  # for a later section (disagg serves the same model and prompts)
        keep.update(folder=folder, prompts=prompts, ours=ours, theirs=theirs, hf32=hf32)
    del engine
    equal = sum(a == b for a, b in zip(ours, theirs))
    diffs = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            continue
        j = next(k for k in range(new) if a[k] != b[k])
        ctx = torch.tensor([prompts[i] + a[:j]], device=DEV)
        with torch.no_grad():
            logits = hf32(ctx).logits[0, -1].float()
        top = torch.topk(logits, 2)
        gap = float(logits[b[j]] - logits[a[j]])
        ulp = _bf16_ulp(float(top.values[0]))
        diffs.append(
            {
                "prompt": i,
                "position": j,
                "ours": a[j],
                "transformers": b[j],
                "fp32_logit_gap": gap,
                "fp32_top1": float(top.values[0]),
                "bf16_ulp_at_top1": ulp,
                "near_tie": abs(gap) <= 2 * ulp,
            }
        )
    return {
        "prompts": len(prompts),
        "new_tokens": new,
        "equal": equal,
        "equal_fraction": equal / len(prompts),
        "all_differences_near_ties": all(d["near_tie"] for d in diffs),
        "differences": diffs,
        "batched_equals_single_eager": f"{sum(x == y for x, y in zip(single, ours))}/{len(single)}",
        "engine_s": t_ours,
        "transformers_s": t_hf,
    }


MEMORIZER = {
    **SMOL,
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 1024,
}


@section
def greedy() -> dict:
    """A model with a trained model's confidence: no checkpoint reaches the GPU machine, so a small
    Llama is trained here, in seconds, to memorize random documents; prompts are their prefixes
    (8 to 200 tokens), so each next token follows from the context through attention."""
    cfg = sz(MEMORIZER, {**MEMORIZER, "num_hidden_layers": 2})
    folder = model_folder(cfg)
    torch.manual_seed(0)
    hf32 = hf_model(folder, torch.float32)
    gen = torch.Generator().manual_seed(3)
    n_docs, doc_len = sz(64, 8), sz(320, 64)
    docs = torch.randint(3, cfg["vocab_size"], (n_docs, doc_len), generator=gen).to(DEV)
    opt = torch.optim.AdamW(hf32.parameters(), lr=3e-3, weight_decay=0.0)
    hf32.train()
    t0 = time.perf_counter()
    steps = 0
    for _ in range(sz(1000, 5)):
        steps += 1
        loss = hf32(input_ids=docs, labels=docs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if float(loss.detach()) < 0.005:
            break
    hf32.eval()
    hf32.requires_grad_(False)
    training = {"steps": steps, "final_loss": float(loss), "seconds": time.perf_counter() - t0}
    log(f"  trained: {training}")
    n_prompts, new = sz(30, 3), sz(32, 4)
    lengths = torch.randint(8, sz(200, 24), (n_prompts,), generator=gen).tolist()
    prompts = [docs[i % n_docs, :n].tolist() for i, n in enumerate(lengths)]
    result = _greedy_check(folder, hf32, prompts, new, keep=STATE.setdefault("greedy", {}))
    return {
        "model": "trained memorizer (4 layers, hidden 256, vocab 2048)",
        "training": training,
        **result,
    }


@section
def disagg() -> dict:
    """The trained model of `greedy` served end to end on the GPU: 1 prefill + 1 decode worker
    process and the router (`tandem up --device cuda`), KV streamed from device memory over gRPC;
    the tokens must equal the in-process engine's and be compared with transformers'."""
    from tandem_worker.engine.sampling_params import SamplingParams
    from tandem_worker.server.client import Client, build_request
    from tandem_worker.server.local import LocalDeployment, free_port

    g = STATE.get("greedy")
    if not g:
        raise RuntimeError("run the greedy section first: this one serves its trained model")
    folder = Path(tempfile.mkdtemp(prefix="tandem-disagg-"))
    g["hf32"].save_pretrained(str(folder))  # safetensors + config.json, as a user's checkpoint
    copy_tokenizer(folder)
    deployment = LocalDeployment(
        prefill=1,
        decode=1,
        port=free_port(),
        model=str(folder),
        kv_cache_bytes=1 << 30,
        device=DEV,
        log_dir=str(Path(ARGS.out) / "disagg-logs"),
    )
    t0 = time.perf_counter()
    deployment.start()
    started = time.perf_counter() - t0
    try:
        params = SamplingParams(max_tokens=len(g["ours"][0]), temperature=0.0, ignore_eos=True)
        with Client(deployment.endpoint) as client:
            t0 = time.perf_counter()
            done = client.complete_all([build_request(p, params) for p in g["prompts"]], timeout=300)
            elapsed = time.perf_counter() - t0
    finally:
        deployment.stop()
    served = [c.token_ids for c in done]
    return {
        "requests": len(served),
        "equal_in_process_engine": sum(a == b for a, b in zip(served, g["ours"])),
        "equal_transformers": sum(a == b for a, b in zip(served, g["theirs"])),
        "startup_s": started,
        "all_requests_s": elapsed,
        "ttft_median_ms": 1e3 * statistics.median(c.timings.get("ttft", 0.0) for c in done),
    }


@section
def greedy_random() -> dict:
    """SmolLM2's shape with random weights: near-ties everywhere (a random model's logits are
    Gaussian), so this one measures how often bf16 rounding flips them, not correctness alone."""
    folder = model_folder(sz(SMOL, {**SMOL, "num_hidden_layers": 2}))
    torch.manual_seed(0)
    hf32 = hf_model(folder, torch.float32)
    with torch.no_grad():
        hf32.lm_head.weight.mul_(20.0)  # logit std ~10, as a trained model's
    gen = torch.Generator().manual_seed(1)
    n_prompts, new = sz(30, 3), sz(32, 4)
    prompts = [
        torch.randint(3, 49152, (int(torch.randint(4, 400, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(n_prompts)
    ]
    return _greedy_check(folder, hf32, prompts, new)


@section
def llama8b() -> dict:
    cfg = sz(LLAMA3_8B, TINY_LLAMA)
    folder = model_folder(cfg)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    hf = hf_model(folder, torch.bfloat16)
    log(f"  transformers 8B built in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    engine = engine_for(
        folder,
        hf,
        kv_cache_bytes=sz(12 << 30, 64 << 20),
        max_model_len=4096,
        max_num_batched_tokens=8192,
        max_num_seqs=256,
        cuda_graph_max_batch=256,
    )
    log(f"  engine built (graphs captured) in {time.perf_counter() - t0:.1f} s")
    out: dict = {"params": sum(p.numel() for p in hf.parameters())}
    peak = RESULTS.get("ceilings", {}).get("matmul_bf16_TFLOPs")
    n_layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    from tandem_worker.engine.sampling_params import SamplingParams

    # --- prefill, 2K prompt: one engine step
    L = sz(2048, 64)
    gen = torch.Generator().manual_seed(2)
    times = []
    for _ in range(4):
        prompt = torch.randint(3, cfg["vocab_size"], (L,), generator=gen).tolist()
        engine.add_request(prompt_token_ids=prompt, params=SamplingParams(max_tokens=1, temperature=0.0))
        sync()
        t0 = time.perf_counter()
        while engine.num_unfinished:
            engine.step()
        sync()
        times.append(time.perf_counter() - t0)
    t_prefill = statistics.median(times[1:])
    # matmul FLOPs (2 per weight per token, lm_head for one token) + causal attention (QK^T and PV)
    weights = out["params"] - cfg["vocab_size"] * hidden * 2
    flops = 2 * weights * L + 2 * cfg["vocab_size"] * hidden + n_layers * 2 * 2 * L * L * hidden / 2
    out["prefill_2k"] = {
        "seconds": t_prefill,
        "tokens_per_s": L / t_prefill,
        "TFLOPs": flops / t_prefill / 1e12,
        "MFU_vs_989_dense_bf16": flops / t_prefill / 989e12,
    }
    if peak:
        out["prefill_2k"]["MFU_vs_measured_matmul"] = flops / t_prefill / (peak * 1e12)
    ids = torch.tensor([prompt], device=DEV)
    with torch.inference_mode():
        hf(ids)
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            hf(ids, logits_to_keep=1)
        sync()
    out["prefill_2k"]["transformers_seconds"] = (time.perf_counter() - t0) / 3
    log(f"  prefill: {out['prefill_2k']}")

    # --- decode: tokens/s over decode-only steps, against transformers generate
    prompt_len, steps = sz(128, 16), sz(16 if ARGS.quick else 64, 3)
    for batch in sz((1, 16, 64, 256), (1, 3)):
        prompts = [
            torch.randint(3, cfg["vocab_size"], (prompt_len,), generator=gen).tolist() for _ in range(batch)
        ]
        params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
        for p in prompts:
            engine.add_request(prompt_token_ids=p, params=params)
        t_ours = time_decode_steps(engine, batch, steps, warm=1)
        ours_tps = batch * steps / t_ours
        ids = torch.tensor(prompts, device=DEV)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)  # warm-up
            sync()
            t0 = time.perf_counter()
            hf.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
            sync()
            t_pre = time.perf_counter() - t0
            t0 = time.perf_counter()
            hf.generate(ids, attention_mask=mask, max_new_tokens=steps + 1, do_sample=False)
            sync()
            t_all = time.perf_counter() - t0
        hf_tps = batch * steps / max(t_all - t_pre, 1e-9)
        # The step's GPU time alone: its captured graph replayed back to back (on the last step's
        # inputs; those requests are done and their blocks free). The rest of a step is host work
        # the GPU waits on (benchmarks/bench_host.py measures it on any machine).
        out[f"decode_b{batch}"] = row = {
            "tandem_tokens_per_s": ours_tps,
            "transformers_tokens_per_s": hf_tps,
            "speedup": ours_tps / hf_tps,
            "tandem_ms_per_step": 1e3 * t_ours / steps,
        }
        graphs = engine.runner.graphs
        if graphs is not None:  # none off CUDA (--smoke)
            replay = graphs._graphs[graphs.sizes[bisect.bisect_left(graphs.sizes, batch)]].replay
            row["graph_replay_ms"] = bench_ms(replay)
            row["host_ms_per_step"] = row["tandem_ms_per_step"] - row["graph_replay_ms"]
        log(f"  decode b{batch}: {out[f'decode_b{batch}']}")
    del engine, hf
    torch.cuda.empty_cache()
    return out


def _write_adapter(folder: Path, cfg: dict, rank: int, seed: int) -> None:
    """A PEFT-format LoRA adapter on all seven projections of every layer (random weights)."""
    from safetensors.torch import save_file

    from tandem_worker.engine.config import ModelConfig
    from tandem_worker.engine.lora import MODULE_KIND, module_shapes

    shapes = module_shapes(ModelConfig.from_dict(cfg))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, kind in MODULE_KIND.items():
            fan_in, fan_out = shapes[module]
            where = "self_attn" if kind in ("qkv", "o") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{where}.{module}"
            tensors[f"{key}.lora_A.weight"] = (
                torch.randn(rank, fan_in, generator=gen) * fan_in**-0.5
            ).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.01).bfloat16()
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    conf = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULE_KIND)}
    (folder / "adapter_config.json").write_text(json.dumps(conf))


@section
def lora_decode() -> dict:
    """Decode steps of a batch of 64 requests on 1 or 8 rank-16 adapters (all seven projections),
    replayed from the LoRA CUDA graphs against the same steps run eagerly, and against the batch
    without adapters; 8 decoder layers of the Llama-3-8B shape (per-layer costs as the full model's).

    Every engine is built first and the measurements interleave, round by round: built and measured
    one after another, each later engine read slower on base-only steps (1.98, 2.12, 2.22 ms, and
    2.26 for the eager one, which runs the same graphs as the first), a drift that hid whatever
    folding costs steps without adapters. Each figure is the median of its rounds."""
    from tandem_kernels import lora as tk_lora
    from tandem_worker.engine.config import EngineConfig
    from tandem_worker.engine.llm_engine import LLMEngine
    from tandem_worker.engine.sampling_params import SamplingParams

    cfg = {**sz(LLAMA3_8B, TINY_LLAMA), "num_hidden_layers": sz(8, 2)}
    folder = model_folder(cfg)
    store = folder / "adapters"
    for i in range(8):
        _write_adapter(store / f"r16-{i}", cfg, 16, seed=i)
    batch, prompt_len, steps, rounds = sz(64, 4), sz(128, 16), sz(32, 3), sz(3, 2)
    gen = torch.Generator().manual_seed(3)
    prompts = [
        torch.randint(3, cfg["vocab_size"], (prompt_len,), generator=gen).tolist() for _ in range(batch)
    ]
    # (mode, graph rank, fold rank, expand tile): "folded" graphs run the LoRA shrink inside the base
    # GEMMs (64: four rank-16 adapters on all projections fit; 8 adapters need 128); "_n128": their
    # expand over 128 output columns a program (lora_folded_sweep's best once), not 64.
    modes = sz(
        (
            ("graphs", 64, 0, 64),
            ("folded", 64, 64, 64),
            ("folded128", 64, 128, 64),
            ("folded_n128", 64, 64, 128),
            ("folded128_n128", 64, 128, 128),
            ("eager", 0, 0, 64),
        ),
        (("graphs", 64, 0, 64), ("folded_n128", 64, 64, 128)),
    )
    default_config = tk_lora.APPLY_CONFIG
    engines = {}
    for mode, graph_rank, fold_rank, _ in modes:
        started = time.perf_counter()
        engines[mode] = LLMEngine(
            EngineConfig(
                model=str(folder),
                device=DEV,
                dtype="bfloat16",
                load_format="dummy",
                detokenize=False,
                enable_prefix_caching=False,
                kv_cache_bytes=sz(1 << 30, 64 << 20),
                max_model_len=1024,
                max_num_seqs=batch,
                cuda_graph_max_batch=batch,
                cuda_graph_max_lora_rank=graph_rank,
                cuda_graph_lora_fold_rank=fold_rank,
                lora_store=str(store),
            )
        )
        log(f"  {mode}: engine built in {time.perf_counter() - started:.1f} s")
    samples: dict[str, list[float]] = {}
    generated: dict[tuple[str, int], list[list[int]]] = {}
    for r in range(rounds):
        for adapters in (0, 1, 8):
            names = [None if not adapters else f"r16-{i % adapters}" for i in range(batch)]
            params = SamplingParams(max_tokens=steps + 16, temperature=0.0, ignore_eos=True)
            for mode, _, _, expand_n in modes:
                engine = engines[mode]
                # Read at each launch, so also when this engine captures its LoRA graphs (round 0).
                tk_lora.APPLY_CONFIG = dataclasses.replace(default_config, expand_block_n=expand_n)
                rids = [
                    engine.add_request(prompt_token_ids=p, params=params, adapter=name)
                    for p, name in zip(prompts, names)
                ]
                # Untimed: adapters load, prompts prefill, the LoRA graph of this batch size is captured.
                got: dict = {}
                elapsed = time_decode_steps(engine, batch, steps, warm=2, tokens=got)
                samples.setdefault(f"{mode}_{adapters}ad", []).append(1e3 * elapsed / steps)
                if r == 0:
                    generated[(mode, adapters)] = [got[rid] for rid in rids]
                log(f"  round {r}, {mode}, {adapters} adapters: {1e3 * elapsed / steps:.3f} ms a step")
    out: dict = {}
    for key, ms in samples.items():
        median = statistics.median(ms)
        out[key] = {"ms_per_step": median, "tokens_per_s": 1e3 * batch / median, "rounds_ms": ms}
    for adapters in (1, 8):
        base = out["graphs_0ad"]["ms_per_step"]
        out[f"lora_overhead_{adapters}ad"] = {
            mode: out[f"{mode}_{adapters}ad"]["ms_per_step"] / base - 1 for mode, *_ in modes
        }
    # Greedy tokens against the unfolded graphs' (bf16: cuBLAS may pick another GEMM for the
    # folded weights' shapes, so near-ties can differ): the share of requests identical throughout.
    out["same_tokens_as_graphs"] = {
        f"{mode}_{adapters}ad": statistics.mean(
            a == b for a, b in zip(generated[(mode, adapters)], generated[("graphs", adapters)])
        )
        for mode, *_ in modes
        for adapters in (0, 1, 8)
        if mode != "graphs"
    }
    # What folding costs a step without adapters (its weights are views of larger buffers).
    out["fold_cost_0ad"] = {
        mode: out[f"{mode}_0ad"]["ms_per_step"] / out["graphs_0ad"]["ms_per_step"] - 1 for mode, *_ in modes
    }
    tk_lora.APPLY_CONFIG = default_config
    del engines, engine
    if DEV == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree(folder, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------ kv transfer


KV_SHAPE = (32, 8, 128)  # Llama-3-8B: layers, kv heads, head dim; bf16
KV_TOKENS = 2048
KV_BLOCK = 16


def _kv_messages(stager, kv: torch.Tensor, layers, slots: torch.Tensor):
    """The prefill side's work for `layers`: stage each layer to pinned host memory (all queued
    first, as the engine does while it computes), then encode its messages as each copy lands."""
    from tandem_worker.server.kv_transfer import kv_chunks

    staged = [stager.stage(kv, layer, slots) for layer in layers]
    for layer, (k, v, ev) in zip(layers, staged):
        ev.synchronize()
        yield from kv_chunks(layer, 0, k, v)


def _kv_server(port: int, ready, shape: tuple[int, int, int], tokens: int, dev: str) -> None:
    import grpc

    from tandem_proto.v1 import worker_pb2 as wpb
    from tandem_worker.engine.kv_staging import KVStager
    from tandem_worker.server.kv_transfer import encode_kv_chunk, prefill_method_handler

    layers, heads, dim = shape
    blocks = tokens // KV_BLOCK
    kv = torch.randn(2, layers, blocks + 4, KV_BLOCK, heads, dim, dtype=torch.bfloat16, device=dev)
    slots = torch.arange(tokens, device=dev)
    stager = KVStager(torch.device(dev))
    last = encode_kv_chunk(wpb.KVChunk(last=True, first_token=1))
    # The same prompt's messages, encoded once: "bare/" requests get them with no KV work at all,
    # so their rate is the gRPC transport's own ceiling for these message sizes.
    encoded = list(_kv_messages(stager, kv, range(layers), slots))

    def prefill(request, context):
        rid = request.request_id
        if rid.startswith("bare/"):
            yield from encoded
            yield last
            return
        # "<id>/<shard>of<n>": only layers shard, shard + n, ... (the parallel-streams probe in kv())
        shard, n = map(int, rid.rpartition("/")[2].split("of")) if "/" in rid else (0, 1)
        yield from _kv_messages(stager, kv, range(shard, layers, n), slots)
        yield last

    from concurrent.futures import ThreadPoolExecutor

    from tandem_worker.server.worker_server import GRPC_OPTIONS

    server = grpc.server(ThreadPoolExecutor(4), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((prefill_method_handler(prefill),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    ready.set()
    server.wait_for_termination()


def _kv_pull(channel, request_id: str, cache: torch.Tensor, table: list[int], got: list[int]) -> None:
    """One KV stream into `cache` through the real receive path; appends the bytes it wrote."""
    from tandem_proto.v1 import worker_pb2 as wpb
    from tandem_worker.server.kv_transfer import KVWriter, prefill_stub

    writer = KVWriter(cache, table, KV_BLOCK)
    for header, k, v in prefill_stub(channel)(wpb.PrefillRequest(request_id=request_id)):
        if header.last:
            break
        writer.write(header, k, v)
    writer.finish()
    got.append(writer.bytes)


def _bare_pull(channel, request_id: str, cache: torch.Tensor, table: list[int], got: list[int]) -> None:
    """The same messages received and dropped: no parsing, no copy into the cache."""
    from tandem_proto.v1 import worker_pb2 as wpb
    from tandem_worker.server.kv_transfer import PREFILL_METHOD

    call = channel.unary_stream(PREFILL_METHOD, request_serializer=wpb.PrefillRequest.SerializeToString)
    got.append(sum(len(m) for m in call(wpb.PrefillRequest(request_id=request_id))))


def _kv_streams(port: int, cache: torch.Tensor, table: list[int], streams) -> tuple[dict[str, float], int]:
    """GB/s of one prompt's KV arriving over n concurrent streams (its layers split between them,
    each on a channel and TCP connection of its own), for each n, and over one stream carrying the
    same bytes with no KV work on either side ("bare"); and the bytes a prompt moves."""
    import threading

    import grpc

    from tandem_worker.server.worker_server import GRPC_OPTIONS

    opts = GRPC_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]  # no subchannel shared between them
    kinds = [(str(n), n, _kv_pull) for n in streams] + [("bare", 1, _bare_pull)]
    channels = {
        name: [grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) for _ in range(n)]
        for name, n, _ in kinds
    }
    times: dict[str, list[float]] = {name: [] for name, _, _ in kinds}
    _, layers, _, _, heads, dim = cache.shape
    nbytes = 2 * layers * len(table) * KV_BLOCK * heads * dim * cache.element_size()  # the prompt's KV
    for i in range(4):  # the first round is a warm-up; rounds interleave the kinds
        for name, n, pull in kinds:
            got: list[int] = []
            prefix = "bare" if pull is _bare_pull else f"r{n}-{i}"
            threads = [
                threading.Thread(target=pull, args=(ch, f"{prefix}/{j}of{n}", cache, table, got))
                for j, ch in enumerate(channels[name])
            ]
            t0 = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            sync()
            times[name].append(time.perf_counter() - t0)
            if pull is _kv_pull and sum(got) != nbytes:  # (bare counts message bytes, headers too)
                raise RuntimeError(f"{n} streams moved {sum(got)} bytes of the prompt's {nbytes}")
    for chs in channels.values():
        for ch in chs:
            ch.close()
    rates = {name: nbytes / statistics.median(t[1:]) / 1e9 for name, t in times.items()}
    return rates, nbytes


def _kv_sides(shape: tuple[int, int, int], tokens: int) -> dict[str, float]:
    """Each side's own work in GB/s, in this process with no network: the prefill side staging and
    encoding a prompt's messages, and the decode side parsing them and writing them into a cache;
    then the bytes that arrived are checked against the source KV."""
    from tandem_worker.engine.kv_staging import KVStager
    from tandem_worker.server.kv_transfer import KVWriter, decode_kv_chunk

    layers, heads, dim = shape
    blocks = tokens // KV_BLOCK
    src = torch.randn(2, layers, blocks + 4, KV_BLOCK, heads, dim, dtype=torch.bfloat16, device=DEV)
    slots = torch.arange(tokens, device=DEV)
    stager = KVStager(torch.device(DEV))
    nbytes = 2 * layers * tokens * heads * dim * src.element_size()
    # The receiving cache's blocks in reverse order: writes scatter, as into a real block table.
    table = list(range(blocks))[::-1]
    cache = torch.zeros_like(src)
    send_t, recv_t = [], []
    for _ in range(4):  # the first is a warm-up (pinned pools fill)
        sync()
        t0 = time.perf_counter()
        messages = list(_kv_messages(stager, src, range(layers), slots))
        send_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        writer = KVWriter(cache, table, KV_BLOCK)
        for m in messages:
            writer.write(*decode_kv_chunk(m))
        writer.finish()
        recv_t.append(time.perf_counter() - t0)
    # Block i of the prompt sits in cache block table[i].
    if not torch.equal(cache[:, :, table], src[:, :, :blocks]):
        raise RuntimeError("the KV written on the decode side differs from the prefill side's")
    return {
        "send_GBps": nbytes / statistics.median(send_t[1:]) / 1e9,
        "receive_GBps": nbytes / statistics.median(recv_t[1:]) / 1e9,
    }


@section
def kv() -> dict:
    from tandem_worker.server.local import free_port

    shape, tokens = sz(KV_SHAPE, (2, 2, 64)), sz(KV_TOKENS, 64)
    layers, heads, dim = shape
    port = free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_kv_server, args=(port, ready, shape, tokens, DEV), daemon=True)
    proc.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("KV server did not start")
        blocks = tokens // KV_BLOCK
        cache = torch.zeros(2, layers, blocks + 4, KV_BLOCK, heads, dim, dtype=torch.bfloat16, device=DEV)
        table = list(range(blocks))
        rates, nbytes = _kv_streams(port, cache, table, streams=(1, 2, 4, 8))
        t = nbytes / rates["1"] / 1e9
        # The ceiling of any host-staged path: the same bytes device->pinned host->device, raw.
        src = cache.view(2, layers, -1)[:, :, : tokens * heads * dim]
        host = torch.empty(src.shape, dtype=src.dtype, pin_memory=DEV == "cuda")
        dst = torch.empty_like(src)

        def raw():
            host.copy_(src, non_blocking=True)
            dst.copy_(host, non_blocking=True)

        t_raw = bench_ms(raw, warmup=3, rep=20) * 1e-3
        return {
            "bytes_per_request": nbytes,
            "grpc_GBps": nbytes / t / 1e9,
            "grpc_seconds": t,
            "raw_pinned_roundtrip_GBps": src.nbytes / t_raw / 1e9,
            "fraction_of_raw": (nbytes / t) / (src.nbytes / t_raw),
            # One Python gRPC stream is bound by its serial copies (encode, gRPC's slice, the
            # socket, the received bytes, pinned staging) on one or two cores: whether 2/4/8
            # streams, each its own connection, scale is what decides if the KV connector should
            # split a prompt's layers between them.
            "streams_GBps": {n: r for n, r in rates.items() if n != "bare"},
            # Where one stream's time goes: the transport alone (the same messages, no KV work),
            # and each side's KV work alone (no network). The slowest of the three bounds it.
            "bare_grpc_GBps": rates["bare"],
            **_kv_sides(shape, tokens),
        }
    finally:
        proc.terminate()
        proc.join(10)


# ------------------------------------------------------------------------------------ main


@section
def sampling() -> dict:
    from bench_sampling import compare  # benchmarks/, beside this script

    found = compare(sz([16, 64, 256], [2]), sz(128256, 1000), DEV, repeat=sz(20, 2))
    return {
        f"{name.replace(' ', '_')}_b{batch}": {
            "tandem_ms": ours,
            "transformers_ms": theirs,
            "speedup": theirs / ours,
        }
        for name, rows in found.items()
        for batch, (ours, theirs) in rows.items()
    }


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="folder holding tokenizer.json (any; prompts are token ids). Default: the built-in model's",
    )
    parser.add_argument("--out", default=".", help="folder for results.json")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, in order")
    parser.add_argument("--quick", action="store_true", help="fewer decode steps")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: check the script itself")
    ARGS = parser.parse_args()
    if ARGS.tokenizer is None:
        from tandem_worker.engine.loader import resolve_model

        ARGS.tokenizer = str(resolve_model("smollm2-135m"))
    if ARGS.smoke:
        global DEV, SMOKE
        DEV, SMOKE = "cpu", True
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        os.environ["TANDEM_KERNELS"] = "triton"
    elif not torch.cuda.is_available():
        print("bench_gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers
    import triton

    RESULTS["env"] = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
    }
    log(json.dumps(RESULTS["env"]))
    out_dir = Path(ARGS.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ARGS.sections.split(","):
        t0 = time.perf_counter()
        log(f"== {name}")
        try:
            RESULTS[name] = SECTIONS[name]()
        except Exception as e:  # record and go on: one lease, every section gets its chance
            traceback.print_exc()
            RESULTS[name] = {"error": f"{type(e).__name__}: {e}"}
        RESULTS[name]["section_seconds"] = time.perf_counter() - t0
        log(f"   {name}: {json.dumps(RESULTS[name], default=str)[:1500]}")
        (out_dir / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
