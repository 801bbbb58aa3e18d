"""Latency models of one prefill and one decode instance, for the simulator, and their calibration.

    prefill batch time  = a + sum over the batch's prompts of (b * n + c * n^2)
    decode step time    = d + e * batch + f * (context tokens held by the batch)
    KV transfer time    = latency + prompt_tokens * kv_bytes_per_token / bandwidth

Defaults (`LatencyModel()`): an 8B-class dense model (Llama-3-8B shape: 32 layers, 8 KV heads of
128, bf16) on one H100-80GB per instance, from public figures:

* Prefill: ~16 GFLOP per token (2 x 8B parameters); at the ~35-40% MFU serving engines reach on
  prefill of a 989 TFLOPS (bf16 dense) H100 that is ~11k tokens/s; b = 90 us/token, plus a = 10 ms
  per batch (launch, scheduling, sampling) and c = 1.3 ns/token^2 for attention, which adds ~12% at
  8k-token prompts (attention FLOPs ~ 4 * layers * hidden * n per token). A 2k-token prompt takes
  ~0.2 s (~10k tokens/s), the figure commonly reported for vLLM/SGLang on H100.
* Decode: one step reads the 16 GB of weights (~5 ms at 3.35 TB/s) plus overheads: d = 8 ms;
  e = 0.15 ms per sequence (sampling, per-sequence compute); f = 50 ns per context token (128 KiB of
  KV per token read at ~2.6 TB/s). Batch 32 of 2k-token contexts: 8 + 4.8 + 3.3 = ~16 ms per step,
  inside the 15-25 ms usually measured at moderate batch.
* KV: 131072 bytes per token (32 x 8 x 128 x 2 (K, V) x 2 bytes); 450k tokens per decode instance
  (80 GB - 16 GB weights - ~6 GB activations and runtime, i.e. ~58 GB); transfer at 25 GB/s (a
  200 Gb/s RDMA NIC at full rate) + 2 ms.

Calibration: `LatencyModel.calibrated(points)` fits a, b, c and d, e, f by least squares (plain
Python normal equations; coefficients that come out negative are dropped and the rest refitted)
from measured points, a JSON object:

    {"prefill": [{"tokens": 2048, "seconds": 0.21}, {"tokens": [512, 512, 1024], "seconds": 0.2}],
     "decode":  [{"batch": 16, "context_tokens": 8192, "seconds": 0.019}],
     "kv_bytes_per_token": 131072, "kv_capacity_tokens": 450000,
     "transfer_bandwidth_bytes_per_s": 25e9}

(`tokens` of a prefill point: one prompt length or the lengths of one batch.) Any key may be left
out; what is missing keeps the defaults. CPU measurements from `benchmarks/bench_engine.py` can be
fed in this way: its cases report output tokens/s for a batch of known prompt lengths, so a decode
point is `{"batch": B, "context_tokens": B * (prompt + new/2), "seconds": B / tokens_per_s}`, and a
batch-1 run with a long prompt and one new token gives a prefill point. A CPU-calibrated model then
simulates the CPU deployment (`tandem up`), not an H100 one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LatencyModel:
    prefill_a: float = 0.010
    prefill_b: float = 9.0e-5
    prefill_c: float = 1.3e-9
    decode_d: float = 0.008
    decode_e: float = 1.5e-4
    decode_f: float = 5.0e-8
    kv_bytes_per_token: int = 131072
    kv_capacity_tokens: int = 450_000
    transfer_bandwidth_bytes_per_s: float = 25e9
    transfer_latency_s: float = 0.002
    prefill_max_batch_tokens: int = 16384
    decode_max_batch: int = 256
    prefill_gpus: int = 1  # GPUs per prefill instance
    decode_gpus: int = 1

    def prefill_time(self, lengths: Sequence[int]) -> float:
        return self.prefill_a + sum(self.prefill_b * n + self.prefill_c * n * n for n in lengths)

    def decode_step_time(self, batch: int, context_tokens: int) -> float:
        return self.decode_d + self.decode_e * batch + self.decode_f * context_tokens

    def transfer_time(self, tokens: int) -> float:
        return (
            self.transfer_latency_s + tokens * self.kv_bytes_per_token / self.transfer_bandwidth_bytes_per_s
        )

    def prefill_tokens_per_second(self, prompt_tokens: int = 2048) -> float:
        """Throughput of back-to-back single-prompt batches of this length."""
        return prompt_tokens / self.prefill_time([prompt_tokens])

    @classmethod
    def calibrated(
        cls, points: dict[str, Any] | str | Path, base: LatencyModel | None = None
    ) -> LatencyModel:
        """A model fitted to measured points (a dict, or the path of a JSON file); see the module doc."""
        if not isinstance(points, dict):
            points = json.loads(Path(points).read_text(encoding="utf-8"))
        model = base or cls()
        changes: dict[str, Any] = {}
        pre = points.get("prefill") or []
        if pre:
            rows, ys = [], []
            for p in pre:
                toks = p["tokens"] if isinstance(p["tokens"], list) else [p["tokens"]]
                rows.append([1.0, float(sum(toks)), float(sum(n * n for n in toks))])
                ys.append(float(p["seconds"]))
            a, b, c = fit_nonnegative(rows, ys)
            changes.update(prefill_a=a, prefill_b=b, prefill_c=c)
        dec = points.get("decode") or []
        if dec:
            rows = [[1.0, float(p["batch"]), float(p.get("context_tokens", 0))] for p in dec]
            d, e, f = fit_nonnegative(rows, [float(p["seconds"]) for p in dec])
            changes.update(decode_d=d, decode_e=e, decode_f=f)
        names = {f.name for f in fields(cls)}
        for k, v in points.items():
            if k in names:
                changes[k] = type(getattr(model, k))(v)
        return replace(model, **changes)


def _solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(v)
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        scale = max(abs(x) for row in a for x in row[:n]) or 1.0
        if abs(a[piv][col]) <= 1e-12 * scale:
            return None
        a[col], a[piv] = a[piv], a[col]
        for r in range(n):
            if r != col:
                k = a[r][col] / a[col][col]
                for c in range(col, n + 1):
                    a[r][c] -= k * a[col][c]
    return [a[i][n] / a[i][i] for i in range(n)]


def least_squares(rows: list[list[float]], ys: list[float]) -> list[float] | None:
    """argmin ||X w - y||^2 via the normal equations (columns scaled first for conditioning)."""
    k = len(rows[0])
    scales = [max(abs(r[j]) for r in rows) or 1.0 for j in range(k)]
    xs = [[r[j] / scales[j] for j in range(k)] for r in rows]
    xtx = [[sum(x[i] * x[j] for x in xs) for j in range(k)] for i in range(k)]
    xty = [sum(x[i] * y for x, y in zip(xs, ys)) for i in range(k)]
    w = _solve(xtx, xty)
    return None if w is None else [wi / s for wi, s in zip(w, scales)]


def fit_nonnegative(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0: drop the negative (or unidentifiable) ones, refit."""
    k = len(rows[0])
    active = list(range(k))
    while active:
        sub = [[r[j] for j in active] for r in rows]
        w = least_squares(sub, ys) if len(rows) >= len(active) else None
        if w is None:
            active.pop()  # too few points or collinear: drop the highest-order term
            continue
        neg = [j for j, wj in zip(active, w) if wj < 0]
        if not neg:
            out = [0.0] * k
            for j, wj in zip(active, w):
                out[j] = wj
            return out
        active.remove(neg[-1])
    raise ValueError("cannot fit: no usable points")
