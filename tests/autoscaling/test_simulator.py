"""The discrete-event simulator: conservation, monotonicity, determinism, GPU-minutes, calibration."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tandem_operator.autoscaling import AutoscalingSpec, LatencyModel, SimConfig, simulate
from tandem_operator.autoscaling.latency import fit_nonnegative
from tandem_operator.autoscaling.policy import MetricsWindow, PolicyState, Replicas, decide
from tandem_operator.autoscaling.simulator import (
    Simulator,
    TraceRequest,
    _Req,
    load_azure_trace,
    peak_minute,
    replay_learner,
    smallest_prefill,
    static_peak_size,
    synthetic_trace,
    window_of,
)

SPEC = AutoscalingSpec(
    prefill_min_replicas=1,
    prefill_max_replicas=8,
    decode_min_replicas=1,
    decode_max_replicas=4,
    stabilization_seconds=120,
    cooldown_seconds=30,
    max_step=2,
    prefill_tokens_per_second=10_000,
)
TRACE_CSV = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "traces" / "AzureLLMInferenceTrace_code.csv"
)


def static(p: int, d: int, **kw) -> SimConfig:
    return SimConfig(spec=SPEC, prefill=p, decode=d, autoscale=False, **kw)


def test_conservation_every_request_completes_or_fails():
    # Small KV caches: some requests can never fit (fail at once); an overload with a short drain
    # limit leaves others unfinished (fail at the end). Nothing is lost either way.
    lat = replace(LatencyModel(), kv_capacity_tokens=4000)
    trace = synthetic_trace(rate=20, duration_s=60, prompt=(100, 4500), output=(5, 200), seed=1)
    r = simulate(
        trace, SimConfig(spec=SPEC, latency=lat, prefill=1, decode=1, autoscale=False, drain_limit_s=5)
    )
    assert r.requests == len(trace)
    assert r.met + r.missed_ttft + r.missed_tpot + r.failed == r.requests
    too_big = sum(q.prompt_tokens + q.output_tokens > 4000 for q in trace)
    assert too_big > 0 and r.failed > too_big  # the never-fitting ones and the unfinished ones
    r2 = simulate(
        trace, SimConfig(spec=SPEC, latency=lat, prefill=4, decode=4, autoscale=True, drain_limit_s=600)
    )
    assert r2.met + r2.missed_ttft + r2.missed_tpot + r2.failed == r2.requests
    assert r2.failed == too_big


def test_more_instances_never_worse_on_a_fixed_load():
    trace = synthetic_trace(rate=12, duration_s=120, prompt=(500, 4000), output=(10, 300), seed=2)
    by_p = [simulate(trace, static(p, 1)).attainment for p in range(1, 6)]
    assert by_p == sorted(by_p), by_p
    assert by_p[0] < 0.5 < by_p[-1]  # the load is heavy for one prefill instance and fine for five
    heavy_decode = synthetic_trace(rate=12, duration_s=60, prompt=(100, 300), output=(400, 800), seed=3)
    lat = replace(LatencyModel(), decode_e=2e-3)  # a slow decode: TPOT depends on the batch
    by_d = [
        simulate(
            heavy_decode, SimConfig(spec=SPEC, latency=lat, prefill=2, decode=d, autoscale=False)
        ).attainment
        for d in range(1, 5)
    ]
    assert by_d == sorted(by_d), by_d
    assert by_d[0] < by_d[-1]


def test_deterministic_given_a_seed():
    trace = synthetic_trace(rate=10, duration_s=300, seed=7)
    assert trace == synthetic_trace(rate=10, duration_s=300, seed=7)
    assert trace != synthetic_trace(rate=10, duration_s=300, seed=8)
    a = simulate(trace, SimConfig(spec=SPEC, prefill=1, decode=1, seed=3))
    b = simulate(trace, SimConfig(spec=SPEC, prefill=1, decode=1, seed=3))
    assert (a.met, a.missed_ttft, a.missed_tpot, a.failed, a.gpu_seconds) == (
        b.met,
        b.missed_ttft,
        b.missed_tpot,
        b.failed,
        b.gpu_seconds,
    )
    assert a.decisions == b.decisions and a.ttft == b.ttft


def test_gpu_minutes_of_a_static_deployment():
    lat = replace(LatencyModel(), prefill_gpus=2, decode_gpus=4)
    trace = synthetic_trace(rate=2, duration_s=600, seed=4)
    r = simulate(trace, SimConfig(spec=SPEC, latency=lat, prefill=3, decode=2, autoscale=False))
    assert r.gpu_minutes == pytest.approx((3 * 2 + 2 * 4) * r.duration_s / 60)
    assert r.duration_s >= trace[-1].arrival


def test_gpu_minutes_bill_a_new_instance_from_the_decision():
    # A load prefill cannot keep up with: the first decision (t=15) adds one prefill instance, and
    # a cooldown and stabilization longer than the run keep it at that.
    spec = replace(
        SPEC, prefill_tokens_per_second=None, max_step=1, cooldown_seconds=1e6, stabilization_seconds=1e6
    )
    trace = [TraceRequest(i * 0.05, 2000, 2) for i in range(4000)]  # 40k prompt tokens/s for 200 s
    r = simulate(trace, SimConfig(spec=spec, prefill=1, decode=1, interval_s=15))
    assert [d[:3] for d in r.decisions] == [(15.0, 2, 1)]
    assert r.gpu_seconds == pytest.approx(2 * r.duration_s + (r.duration_s - 15.0))


def test_autoscaler_scales_up_under_load_and_back_down_after():
    burst = synthetic_trace(rate=15, duration_s=300, prompt=(1000, 3000), output=(10, 50), seed=5)
    tail = [TraceRequest(t, 500, 5) for t in range(300, 1200, 10)]  # a trickle afterwards
    r = simulate(burst + tail, SimConfig(spec=SPEC, prefill=1, decode=1))
    assert r.max_prefill > 1
    assert r.sizes[-1][1] < r.max_prefill  # scaled back down
    under = simulate(burst + tail, static(1, 1))
    assert r.attainment > under.attainment + 0.2


def test_static_peak_size_is_the_smallest_meeting_the_target():
    quiet = synthetic_trace(rate=1, duration_s=600, seed=6)
    peak = synthetic_trace(rate=15, duration_s=60, prompt=(1000, 3000), seed=6, start=240)
    trace = sorted(quiet + peak, key=lambda r: r.arrival)
    assert peak_minute(trace) == 240
    p, d, start, res = static_peak_size(trace, SimConfig(spec=SPEC))
    assert start == 240 and res.attainment >= SPEC.attainment
    minute = window_of(trace, 240, 300)
    assert simulate(minute, static(p, d)).attainment >= SPEC.attainment
    if p > 1:
        assert simulate(minute, static(p - 1, d)).attainment < SPEC.attainment


def test_a_schedule_sizes_the_deployment_in_place_of_the_policy():
    # The same heavy load the policy would scale for: the schedule holds 1 prefill instance, then
    # asks for 3 at the decision at t=60 (served after the cold start), then 2.
    trace = [TraceRequest(i * 0.05, 2000, 2) for i in range(3000)]  # 40k prompt tokens/s for 150 s
    asked = []

    def schedule(now: float) -> tuple[int, int]:
        asked.append(now)
        return (1 if now < 60 else 3 if now < 120 else 2), 1

    cfg = SimConfig(spec=SPEC, prefill=1, decode=1, interval_s=15, provisioning_s=20)
    r = simulate(trace, cfg, schedule)
    assert asked[:4] == [15.0, 30.0, 45.0, 60.0]
    assert [d[:3] for d in r.decisions] == [(60.0, 3, 1), (120.0, 2, 1)]
    assert r.max_prefill == 3
    # Billed from the decision: the two added at 60 s, one of them until it drained after 120 s.
    assert r.gpu_seconds > 2 * r.duration_s + (r.duration_s - 60.0) + 60.0
    policy = simulate(trace, cfg)  # without a schedule the policy decides, and does otherwise
    assert [d[:3] for d in policy.decisions] != [d[:3] for d in r.decisions]


def test_replay_learner_sizes_from_the_past_alone():
    quiet = synthetic_trace(rate=1, duration_s=600, prompt=(500, 1500), seed=11)
    burst = synthetic_trace(rate=15, duration_s=60, prompt=(1000, 3000), seed=12, start=420)
    trace = sorted(quiet + burst, key=lambda r: r.arrival)
    cfg = SimConfig(spec=SPEC)
    run, steps = replay_learner(trace, cfg, decode=1, target=0.9, max_prefill=8)
    sizes = dict(steps)
    # Each step is the smallest fixed size meeting the target on what had arrived by then...
    at_target = replace(cfg, spec=replace(SPEC, attainment=0.9))
    for t in (300.0, 540.0):
        expect, _ = smallest_prefill(window_of(trace, 0.0, t), at_target, 1, 8)
        assert sizes[t] == expect
    # ...so it is small before the burst and grows once it has seen it, too late for the burst.
    assert sizes[360.0] == 1 and sizes[540.0] > 1
    assert run.attainment < simulate(trace, static(sizes[540.0], 1)).attainment
    # Causal: what comes later does not change the steps before it.
    louder = sorted(
        trace + synthetic_trace(rate=30, duration_s=60, prompt=(1000, 3000), seed=13, start=500),
        key=lambda r: r.arrival,
    )
    _, louder_steps = replay_learner(louder, cfg, decode=1, target=0.9, max_prefill=8)
    assert [s for s in louder_steps if s[0] <= 480] == [s for s in steps if s[0] <= 480]
    assert dict(louder_steps)[540.0] > sizes[540.0]


def test_calibration_recovers_known_coefficients():
    true = LatencyModel(
        prefill_a=0.02, prefill_b=1e-4, prefill_c=2e-9, decode_d=0.01, decode_e=3e-4, decode_f=1e-7
    )
    points = {
        "prefill": [{"tokens": n, "seconds": true.prefill_time([n])} for n in (128, 512, 2048, 4096, 8192)]
        + [{"tokens": [512, 1024], "seconds": true.prefill_time([512, 1024])}],
        "decode": [
            {"batch": b, "context_tokens": c, "seconds": true.decode_step_time(b, c)}
            for b, c in ((1, 100), (8, 4000), (32, 20000), (64, 10000), (16, 60000))
        ],
        "kv_capacity_tokens": 123456,
    }
    m = LatencyModel.calibrated(points)
    for name in ("prefill_a", "prefill_b", "prefill_c", "decode_d", "decode_e", "decode_f"):
        assert getattr(m, name) == pytest.approx(getattr(true, name), rel=1e-6), name
    assert m.kv_capacity_tokens == 123456


def test_calibration_drops_negative_terms():
    # Throughput that improves with length beyond linear would need c < 0: c is dropped, a and b refitted.
    rows = [[1.0, n, n * n] for n in (100.0, 1000.0, 5000.0)]
    ys = [0.01 + 1e-4 * n - 1e-9 * n * n for n in (100.0, 1000.0, 5000.0)]
    a, b, c = fit_nonnegative(rows, ys)
    assert c == 0.0 and a >= 0 and b > 0


def test_calibration_from_a_file(tmp_path):
    f = tmp_path / "points.json"
    f.write_text('{"prefill": [{"tokens": 1000, "seconds": 0.5}], "decode_max_batch": 8}')
    m = LatencyModel.calibrated(f)
    assert m.prefill_time([1000]) == pytest.approx(0.5)
    assert m.decode_max_batch == 8


@pytest.mark.skipif(not TRACE_CSV.exists(), reason="the shared Azure trace is not here")
def test_azure_trace_loads():
    trace = load_azure_trace(TRACE_CSV)
    assert len(trace) == 8819
    assert trace[0].arrival == 0.0 and 3400 < trace[-1].arrival < 3500
    assert all(a.arrival <= b.arrival for a, b in zip(trace, trace[1:]))


def test_the_policy_learns_prefill_throughput_in_the_simulator():
    from tandem_operator.autoscaling.simulator import Simulator

    spec = replace(SPEC, prefill_tokens_per_second=None)
    trace = synthetic_trace(rate=8, duration_s=300, prompt=(1000, 3000), output=(5, 20), seed=9)
    sim = Simulator(trace, SimConfig(spec=spec, prefill=1, decode=1))
    sim.run()
    expected = LatencyModel().prefill_tokens_per_second(2000)
    assert sim.state.prefill_capacity == pytest.approx(expected, rel=0.1)


def scraped(
    decode: list[tuple[list[float], list[int]]], backlog: list[list[int]] | None = None
) -> MetricsWindow:
    """The simulator's window over scrapes 5 s apart of its instances, each scrape given as the KV
    usage and waiting requests of each decode instance (and the queued tokens of each prefill one)."""
    lat = LatencyModel(kv_capacity_tokens=100)
    sim = Simulator([], SimConfig(spec=SPEC, latency=lat))
    for role, n in (("prefill", len(backlog[0]) if backlog else 1), ("decode", len(decode[0][0]))):
        for _ in range(n):
            sim._add(role, 0.0)
    for i, (usage, waiting) in enumerate(decode):
        sim.now = 5.0 * i
        for inst, u, n in zip(sim.instances["decode"], usage, waiting):
            inst.kv_used = round(u * lat.kv_capacity_tokens)
            inst.waiting.extend(_Req(0, 0.0, 1, 1) for _ in range(n - len(inst.waiting)))
        for inst, queued in zip(sim.instances["prefill"], backlog[i] if backlog else []):
            inst.queued_tokens = queued
        sim._scrape()
    return sim.window()


def test_the_windows_max_gauges_are_the_busiest_replicas_as_prometheus_reads_them():
    """`*_max` is the max over replicas and scrapes (the operator's `max(max_over_time(...))`,
    test_prometheus_server.py), not the highest pool mean: on a pool where one replica's KV rises
    (a long context pinned there, requests waiting behind it) the simulator must add decode where
    the operator does, and hold prefill on a backlog queued at one replica."""
    w = scraped([([0.5, 0.2], [0, 0]), ([0.9, 0.2], [2, 0])], backlog=[[0, 0], [6000, 0]])
    assert w.decode_kv_usage_max == pytest.approx(0.9) and w.decode_kv_usage == pytest.approx(0.45)
    assert w.prefill_backlog_tokens_max == 6000 and w.prefill_backlog_tokens == 1500
    d = decide(w, Replicas(2, 2), SPEC, PolicyState(started=-10_000.0), now=0)
    assert d.desired_decode == 3 and "decode 2->3: busiest decode KV usage 90%" in d.reason, d.reason
