"""Goodput-driven autoscaling vs static provisioning for the peak minute, simulated over a real trace.

Workload: the Azure LLM inference trace, code (about 1 hour, 8,819 requests), read in place from
../shared/data/traces/; `--trace FILE` runs another one in the same format (the conv trace,
AzureLLMInferenceTrace_conv.csv: about 1 hour, 19,366 requests, smoother and lighter). Cite:
Patel, Choukse, Zhang, Shah, Goiri, Maleki, Bianchini, "Splitwise: Efficient generative LLM
inference using phase splitting", ISCA 2024 (github.com/Azure/AzurePublicDataset, CC-BY 4.0).

Both sides run in the same discrete-event simulator (tandem_operator.autoscaling.simulator) with
the same latency model (an 8B-class model on one H100 per instance by default, see
tandem_operator/autoscaling/latency.py, or `--calibration FILE` with measured points), the SLOs
the CRD defaults to (TTFT 1000 ms, TPOT 100 ms, attainment 0.9) and 1 GPU per instance:

* static-peak: the cheapest fixed (P, D) that meets the attainment target on the trace's peak
  minute alone (found by simulating that minute), then run over the whole trace;
* autoscaled: starts at the pools' minimum, runs `policy.decide` every 15 s on a 60 s metrics
  window (scraped every 5 s); new instances serve after a 60 s cold start and are billed from the
  decision; removed ones drain. Variants:
  - "SLO+backlog only": the policy sees request outcomes, latency percentiles, backlog and KV
    usage, but no prompt-token rate and no engine-busy time: it scales up on misses and backlog
    and can only step down one replica at a time when comfortable;
  - "learned throughput": it also sees the prompt-token arrival rate (peak over 10 s sub-windows)
    and learns a prefill replica's throughput from computed tokens per engine-busy second, and
    sizes prefill for the peak rate as the policy's burst memory raises it (the 0.9 quantile of
    the peaks of the last 10 minutes, plus headroom for the rate's growth over a cold start that it
    measures; see policy.py); with prefill floors (minReplicas) of 1, a quarter and half of the
    static-peak prefill size; with floor 1 and the attainment feedback on (the quantile set from
    the attainment realized over the same 10 minutes: the nominal 0.9 when the horizon used
    exactly its miss budget, none when it used none, more when it overspent); and with floor 1 and
    the burst memory off (sized for the last window's peak alone);
  - the same with the throughput declared instead of learned (what a benchmark of one replica
    measures on 2k-token prompts), and with the CRD's default timing (stabilization 300 s,
    cooldown 60 s, max step 1);
  - the default policy on the same trace started 20 and 40 minutes later (what came before is
    moved to the end), each against its own static-peak size: a policy that only fits one start
    of the trace shows there;
* two bounds no policy can reach, since they are chosen knowing the trace: the best fixed size in
  hindsight, and a per-minute oracle that sizes each minute for its own requests alone and
  resizes instantly (no cold start);
* a reference learner (simulator.replay_learner) that knows every past request exactly but nothing
  of the future: each minute it sets the smallest fixed prefill size whose run of everything seen
  so far would have met a target, the spec's (90%) or a stricter one (95%), with the same cold
  start as the policy. What it attains and pays is what learning the load online costs.

Run: python benchmarks/simulate_autoscaling.py [--trace FILE] [--cold-start 60] [--calibration points.json]
     [--json]
Target (issue 6): at least 90% attainment with at most 60% of the static-peak GPU-minutes. The
headline is the default policy: learned throughput, floor 1 (the pools' minimum), the policy's
defaults for everything the benchmark does not set; the floors above 1 are chosen knowing the
trace's peak (post hoc) and are shown for comparison only.

Where it stands (default latency model, cold start 60 s): on the code trace the default policy
attains 93.2% with 76% of the static-peak GPU-minutes, and 91.3% / 90.3% with 71% / 74% started at
minutes 20 / 40 (the attainment target met from every start, the cost target not). The attainment
feedback cuts GPU-minutes (65%) but oscillates on this trace and misses the attainment target from
every start (88.7%, 86.8%, 85.6%), so it is off by default. For scale: the best fixed size in
hindsight (P=6 D=1) attains 93.3% with 58%, and the per-minute oracle 96.0% with 36%: both reach
the target knowing the trace (the level its bursts reach, or when they come: about every 5 minutes
here, at 5-13x the mean prompt rate, rising within seconds while a new replica takes 60 s to
serve); a policy learning online starts at one replica and has to see bursts to size for them.
The replay learner shows what that costs: aiming at 90% it attains 88.9% with 59%, at 95% 90.3%
with 71% (from minutes 20 / 40: 86.4% / 87.7% with 52% / 54%, and 90.3% / 90.7% with 60% / 66%):
it misses the bursts larger than any it has seen (3, 4.5, then 7 replicas' worth in the first 15
minutes) and then pays for the largest it has seen.

With faster cold starts (`--cold-start 30 / 15 / 5`) the default policy attains 92.4% / 93.1% /
94.3% with 74% / 72% / 74% (from minutes 20 and 40: 91.2-92.5% with 70-73%): it measures the
rate's growth over at least a window, whatever the cold start (see policy.py).

The conv trace is light (static peak P=2 D=1), so the pools' minimum (P=1 D=1) is already 2/3 of
the static-peak GPUs: no autoscaler can reach 60% there. The default policy attains 99.9% with 104%
there (it holds a third prefill replica for the bursts it remembers), the attainment feedback
99.0% with 94%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from tandem_operator.autoscaling import AutoscalingSpec, LatencyModel, SimConfig, load_azure_trace, simulate
from tandem_operator.autoscaling.simulator import (
    SimResult,
    TraceRequest,
    fixed_run,
    replay_learner,
    smallest_prefill,
    static_peak_size,
    window_of,
)

TRACE = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "traces"
    / "AzureLLMInferenceTrace_code.csv"
)
CITATION = (
    "Trace: Azure LLM inference trace 2023 ({kind}), github.com/Azure/AzurePublicDataset, CC-BY 4.0.\n"
    '  Patel, Choukse, Zhang, Shah, Goiri, Maleki, Bianchini. "Splitwise: Efficient generative LLM\n'
    '  inference using phase splitting", ISCA 2024.'
)
TARGET_ATTAINMENT, TARGET_RATIO = 0.90, 0.60


def base_spec(lat: LatencyModel) -> AutoscalingSpec:
    return AutoscalingSpec(
        ttft_ms=1000,
        tpot_ms=100,
        attainment=0.9,  # the CRD's default SLO
        prefill_min_replicas=1,
        prefill_max_replicas=16,
        decode_min_replicas=1,
        decode_max_replicas=8,
        window_seconds=60,
        stabilization_seconds=180,
        cooldown_seconds=30,
        max_step=4,
        target_utilization=0.8,
    )


def rotate(trace: list[TraceRequest], shift_s: float) -> list[TraceRequest]:
    """The trace started `shift_s` later, what came before moved to its end (same requests)."""
    period = trace[-1].arrival + 1.0
    out = [TraceRequest((r.arrival - shift_s) % period, r.prompt_tokens, r.output_tokens) for r in trace]
    return sorted(out, key=lambda r: r.arrival)


def static_baseline(
    trace: list[TraceRequest], spec: AutoscalingSpec, lat: LatencyModel
) -> tuple[int, int, float, SimResult, SimResult]:
    """The static-peak size (P, D), its peak minute's start and result, and its run of the trace."""
    p, d, peak_start, peak = static_peak_size(trace, SimConfig(spec=spec, latency=lat))
    static = simulate(trace, SimConfig(spec=spec, latency=lat, prefill=p, decode=d, autoscale=False))
    return p, d, peak_start, peak, static


def hindsight_bounds(
    trace: list[TraceRequest], spec: AutoscalingSpec, lat: LatencyModel, decode: int, max_prefill: int = 64
) -> dict[str, tuple[float, float, int]]:
    """Two sizings no policy can know in advance, as bounds: (attainment, GPU-minutes, most prefill).

    * best fixed: the smallest prefill size (with `decode`) meeting the target over the whole trace;
    * per-minute oracle: each minute sized for its own requests alone (the smallest prefill meeting
      the target on that minute, run from empty), resized instantly: what knowing every minute's
      load ahead, with no cold start, would cost."""
    cfg = SimConfig(spec=spec, latency=lat)
    gpus = lambda p: p * lat.prefill_gpus + decode * lat.decode_gpus  # noqa: E731
    found = smallest_prefill(trace, cfg, decode, max_prefill)
    if found is None:
        raise ValueError(f"no fixed size up to P={max_prefill} meets the target over the trace")
    p, fixed = found
    met = total = 0
    gpu_min = 0.0
    most = 1
    end = trace[-1].arrival
    for k in range(int(end // 60) + 1):
        minute = window_of(trace, 60.0 * k, 60.0 * (k + 1))
        found = smallest_prefill(minute, cfg, decode, max_prefill)
        if found is None:  # out of reach: the largest size, and its misses, count
            found = max_prefill, fixed_run(minute, cfg, max_prefill, decode)
        size, r = found
        met, total = met + r.met, total + r.requests
        most = max(most, size)
        gpu_min += gpus(size) * min(60.0, end - 60.0 * k) / 60.0
    return {
        f"bound: best fixed size in hindsight P={p} D={decode}": (fixed.attainment, fixed.gpu_minutes, p),
        "bound: per-minute oracle, no cold start": (met / total, gpu_min, most),
    }


def replay_references(
    trace: list[TraceRequest], spec: AutoscalingSpec, lat: LatencyModel, decode: int, cold_start: float
) -> dict[str, tuple[float, float, int]]:
    """The replay learner (simulator.replay_learner): every minute, the smallest fixed prefill size
    that would have met a target on every request seen so far; aiming at the spec's target, and at
    a stricter one (half its miss budget). (attainment, GPU-minutes, most prefill) for each."""
    cfg = SimConfig(spec=spec, latency=lat, provisioning_s=cold_start)
    out = {}
    for target in (spec.attainment, spec.attainment + (1.0 - spec.attainment) / 2):
        r, _ = replay_learner(trace, cfg, decode, target, max_prefill=spec.prefill_max_replicas)
        name = f"reference: replay learner, {target:.0%} on all seen"
        out[name] = (r.attainment, r.gpu_minutes, r.max_prefill)
    return out


def sized_json(sized: dict[str, tuple[float, float, int]], static_gpu_min: float) -> dict:
    """Bounds or references, (attainment, GPU-minutes, most prefill) by name, as the JSON output has them."""
    return {
        name: {"attainment": a, "gpu_minutes": g, "ratio_to_static": g / static_gpu_min}
        for name, (a, g, _) in sized.items()
    }


def row(name: str, r: SimResult, static_gpu_min: float) -> dict:
    return {
        "config": name,
        "attainment": r.attainment,
        "goodput_rps": r.goodput,
        "gpu_minutes": r.gpu_minutes,
        "ratio_to_static": r.gpu_minutes / static_gpu_min,
        "ttft_s": r.ttft,
        "tpot_s": r.tpot,
        "max_prefill": r.max_prefill,
        "max_decode": r.max_decode,
        "scaling_actions": len(r.decisions),
        "missed_ttft": r.missed_ttft,
        "missed_tpot": r.missed_tpot,
        "failed": r.failed,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--cold-start", type=float, default=60.0, help="seconds before a new instance serves")
    ap.add_argument("--calibration", default=None, help="JSON of measured latency points (see latency.py)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.time()
    lat = LatencyModel.calibrated(args.calibration) if args.calibration else LatencyModel()
    trace = load_azure_trace(args.trace)
    spec = base_spec(lat)
    cap = round(lat.prefill_tokens_per_second(2048))

    p, d, peak_start, peak, static = static_baseline(trace, spec, lat)
    rows = [row(f"static-peak P={p} D={d}", static, static.gpu_minutes)]
    # (name, spec, the sim provides rate and busy-time metrics)
    variants = [("auto, SLO+backlog only, P>=1", replace(spec, learn_capacity=False), False)]
    # Prefill floors (minReplicas): none, a quarter and half of the static-peak size.
    half = max(1, p // 2)
    headline = "auto, learned throughput, P>=1"
    floors: dict[int, str] = {}
    for floor, why in ((1, ""), (max(1, p // 4), " (1/4 peak)"), (half, " (1/2 peak)")):
        floors.setdefault(floor, why)  # (one row per floor: on a light trace they coincide)
    for floor, why in sorted(floors.items()):
        variants.append(
            (
                f"auto, learned throughput, P>={floor}{why if floor > 1 else ''}",
                replace(spec, prefill_min_replicas=floor),
                True,
            )
        )
    variants.append(
        (
            "auto, learned throughput, P>=1, attainment fb",
            replace(spec, attainment_feedback=True),
            True,
        )
    )
    variants.append(
        ("auto, learned throughput, P>=1, no burst memory", replace(spec, burst_horizon_seconds=0), True)
    )
    variants.append(
        (
            f"auto, declared {cap} tok/s/replica, P>={half}",
            replace(spec, prefill_tokens_per_second=cap, prefill_min_replicas=half),
            True,
        )
    )
    crd = dict(stabilization_seconds=300, cooldown_seconds=60, max_step=1)  # the CRD's defaults
    variants.append(
        (
            f"auto, learned, P>={half}, CRD timing 300s/60s/step 1",
            replace(spec, prefill_min_replicas=half, **crd),
            True,
        )
    )
    for name, s, metrics in variants:
        cfg = SimConfig(
            spec=s,
            latency=lat,
            prefill=s.prefill_min_replicas,
            decode=s.decode_min_replicas,
            provisioning_s=args.cold_start,
            arrival_rate_metric=metrics,
        )
        rows.append(row(name, simulate(trace, cfg), static.gpu_minutes))
    # The same trace started later (wrapped around): a policy tuned to one start shows here.
    for shift_min in (20, 40):
        shifted = rotate(trace, shift_min * 60.0)
        st = static_baseline(shifted, spec, lat)[4]
        cfg = SimConfig(spec=spec, latency=lat, prefill=1, decode=1, provisioning_s=args.cold_start)
        rows.append(row(f"{headline}, from min {shift_min}", simulate(shifted, cfg), st.gpu_minutes))
    bounds = hindsight_bounds(trace, spec, lat, d)
    references = replay_references(trace, spec, lat, d, args.cold_start)
    elapsed = time.time() - t_start
    head = next(r for r in rows if r["config"] == headline)
    head_ok = head["attainment"] >= TARGET_ATTAINMENT and head["ratio_to_static"] <= TARGET_RATIO

    if args.json:
        print(
            json.dumps(
                {
                    "rows": rows,
                    "headline": {"config": headline, "target_met": head_ok},
                    "static_peak": {
                        "prefill": p,
                        "decode": d,
                        "peak_minute_start_s": peak_start,
                        "peak_minute_attainment": peak.attainment,
                    },
                    "bounds": sized_json(bounds, static.gpu_minutes),
                    "references": sized_json(references, static.gpu_minutes),
                    "latency_model": lat.__dict__,
                    "cold_start_s": args.cold_start,
                    "seconds": elapsed,
                }
            )
        )
        return 0
    kind = "conv" if "conv" in Path(args.trace).name else "code" if "code" in Path(args.trace).name else "?"
    print(CITATION.format(kind=kind) + f"\n  File: {Path(args.trace).name}")
    print(
        f"{len(trace)} requests over {trace[-1].arrival / 60:.1f} min; "
        f"peak minute starts at {peak_start:.0f}s "
        f"(static P={p} D={d} meets {peak.attainment:.1%} there)."
    )
    print(
        f"SLO: TTFT <= {spec.ttft_ms:.0f} ms, TPOT <= {spec.tpot_ms:.0f} ms, "
        f"target attainment {spec.attainment:.0%}; cold start {args.cold_start:.0f}s;\n"
        f"model: prefill {lat.prefill_tokens_per_second(2048):.0f} tok/s on 2k prompts, "
        f"decode step {lat.decode_step_time(32, 32 * 2048) * 1000:.1f} ms at batch 32 x 2k."
    )
    print(
        f"Policy: window {spec.window_seconds:.0f}s, stabilization {spec.stabilization_seconds:.0f}s, "
        f"cooldown {spec.cooldown_seconds:.0f}s, max step {spec.max_step}, "
        f"target utilization {spec.target_utilization:.0%}, decisions every 15 s.\n"
    )
    hdr = (
        f"{'configuration':<50}{'attain':>8}{'goodput':>9}{'GPU-min':>9}{'vs static':>10}"
        f"{'TTFT p50/p90/p99 (s)':>24}{'TPOT p90 ms':>12}{'maxP':>6}{'acts':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        t = r["ttft_s"]
        print(
            f"{r['config']:<50}{r['attainment']:>8.1%}{r['goodput_rps']:>9.2f}{r['gpu_minutes']:>9.1f}"
            f"{r['ratio_to_static']:>10.0%}{t['p50']:>10.2f}/{t['p90']:.2f}/{t['p99']:>5.2f}"
            f"{r['tpot_s']['p90'] * 1000:>12.1f}{r['max_prefill']:>6}{r['scaling_actions']:>6}"
        )
    for name, (a, g, most) in {**bounds, **references}.items():
        print(f"{name:<50}{a:>8.1%}{'':>9}{g:>9.1f}{g / static.gpu_minutes:>10.0%}{'':>36}{most:>6}")
    ok = [
        r for r in rows[1:] if r["attainment"] >= TARGET_ATTAINMENT and r["ratio_to_static"] <= TARGET_RATIO
    ]
    print(
        f"\nTarget: attainment >= {TARGET_ATTAINMENT:.0%} with <= {TARGET_RATIO:.0%} "
        "of the static-peak GPU-minutes."
    )
    print(
        f"Default policy ({headline}, no post-hoc floor): {head['attainment']:.1%} attainment with "
        f"{head['ratio_to_static']:.0%} of the static-peak GPU-minutes: "
        + ("target MET" if head_ok else "target NOT met")
        + (
            ""
            if head_ok
            else " ("
            + ", ".join(
                what
                for what, bad in (
                    ("attainment short", head["attainment"] < TARGET_ATTAINMENT),
                    ("GPU-minutes over", head["ratio_to_static"] > TARGET_RATIO),
                )
                if bad
            )
            + ")"
        )
    )
    print(
        "Any configuration: "
        + ("met by " + "; ".join(r["config"] for r in ok) if ok else "NOT met by any configuration")
    )
    print(f"({elapsed:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
