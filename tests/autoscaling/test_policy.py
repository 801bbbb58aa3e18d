"""The autoscaling policy as a pure function: attribution, data gates, stabilization, guards."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from tandem_operator.autoscaling.policy import (
    AutoscalingSpec,
    Decision,
    MetricsWindow,
    PolicyState,
    Replicas,
    decide,
)

SPEC = AutoscalingSpec(
    prefill_min_replicas=1,
    prefill_max_replicas=10,
    decode_min_replicas=1,
    decode_max_replicas=10,
    stabilization_seconds=300,
    cooldown_seconds=60,
    max_step=2,
    min_requests=20,
)


def window(met=100, ttft=0, tpot=0, failed=0, backlog=0.0, kv=0.1, waiting=0.0, running=4.0, **kw):
    return MetricsWindow(
        duration_s=60,
        met=met,
        missed_ttft=ttft,
        missed_tpot=tpot,
        failed=failed,
        ttft_p90_s=0.3,
        tpot_p90_s=0.02,
        prefill_backlog_tokens=backlog,
        prefill_backlog_tokens_max=backlog,
        prefill_running=1.0 if running else 0.0,
        prefill_waiting=0.0,
        decode_kv_usage=kv,
        decode_kv_usage_max=kv,
        decode_running=running,
        decode_waiting=waiting,
        **kw,
    )


def idle() -> MetricsWindow:
    return window(met=0, backlog=0.0, kv=0.0, running=0.0)


def test_ttft_misses_scale_prefill_only():
    d = decide(window(met=60, ttft=40), Replicas(2, 2), SPEC, PolicyState(), now=1000)
    assert d.desired_prefill > 2
    assert d.desired_decode == 2
    assert "TTFT" in d.reason


def test_tpot_misses_scale_decode_only():
    d = decide(window(met=60, tpot=40), Replicas(2, 2), SPEC, PolicyState(), now=1000)
    assert d.desired_decode > 2
    assert d.desired_prefill == 2
    assert "TPOT" in d.reason


def test_misses_within_the_allowed_fraction_change_nothing_upwards():
    d = decide(window(met=95, ttft=3, tpot=2), Replicas(2, 2), SPEC, PolicyState(), now=1000)
    assert (d.desired_prefill, d.desired_decode) == (2, 2)


def test_ttft_misses_while_decode_kv_is_saturated_go_to_decode():
    w = window(met=60, ttft=40, kv=0.95, waiting=5.0)
    d = decide(w, Replicas(2, 2), SPEC, PolicyState(), now=1000)
    assert d.desired_decode > 2
    assert d.desired_prefill == 2


@pytest.mark.parametrize("w", [None, MetricsWindow(duration_s=60)])
def test_missing_data_holds_and_says_so(w):
    state = PolicyState()
    for t in range(0, 1200, 15):  # long past stabilization and cooldown
        d = decide(w, Replicas(4, 3), SPEC, state, now=t)
        assert (d.desired_prefill, d.desired_decode) == (4, 3)
    assert "no metrics" in d.reason
    assert d.no_data == ("prefill", "decode")


def test_too_few_requests_hold_even_if_all_missed():
    state = PolicyState()
    for t in range(0, 1200, 15):
        d = decide(window(met=0, ttft=5, tpot=5), Replicas(4, 3), SPEC, state, now=t)
        assert (d.desired_prefill, d.desired_decode) == (4, 3)
    assert "too few requests (10 < 20)" in d.reason
    assert d.no_data == ("prefill", "decode")


def test_backlog_scales_prefill_before_any_request_finished():
    w = window(met=0, backlog=5 * SPEC.backlog_target_tokens)
    d = decide(w, Replicas(1, 1), SPEC, PolicyState(), now=100)
    assert d.desired_prefill == 1 + SPEC.max_step
    assert d.desired_decode == 1
    assert "backlog" in d.reason


def test_throughput_hint_sizes_prefill_from_the_peak_rate():
    spec = replace(SPEC, prefill_tokens_per_second=10_000, target_utilization=1.0, max_step=10)
    w = window(prompt_tokens_per_s=20_000, prompt_tokens_per_s_peak=45_000)
    d = decide(w, Replicas(1, 1), spec, PolicyState(), now=100)
    assert d.desired_prefill == 5


def test_kv_usage_scales_decode():
    d = decide(window(kv=0.95), Replicas(2, 2), SPEC, PolicyState(), now=100)
    assert d.desired_decode > 2
    assert d.desired_prefill == 2


def test_flapping_inputs_do_not_flap_replicas():
    """Bad and good windows alternating every decision: up once, never back down."""
    state, cur, sizes = PolicyState(), Replicas(2, 2), []
    for i, t in enumerate(range(0, 3600, 15)):
        w = window(met=50, ttft=50) if i % 2 == 0 else idle()
        d = decide(w, cur, SPEC, state, now=t)
        cur = Replicas(d.desired_prefill, d.desired_decode)
        sizes.append(cur.prefill)
    changes = [b - a for a, b in zip(sizes, sizes[1:]) if b != a]
    assert changes, "the TTFT misses never scaled prefill up"
    assert all(c > 0 for c in changes), f"prefill went down while the load flapped: {sizes}"


def test_scale_down_only_after_a_whole_stabilization_window():
    state, cur = PolicyState(), Replicas(6, 4)
    downs = []
    for t in range(0, 1200, 15):
        d = decide(idle(), cur, SPEC, state, now=t)
        if d.desired_prefill < cur.prefill:
            downs.append(t)
        cur = Replicas(d.desired_prefill, d.desired_decode)
    assert downs and downs[0] >= SPEC.stabilization_seconds
    assert cur == Replicas(1, 1)  # idle: down to the minimum in the end
    assert all(b - a >= SPEC.cooldown_seconds for a, b in zip(downs, downs[1:]))


def test_one_good_window_in_a_bad_stretch_does_not_scale_down():
    spec = replace(SPEC, stabilization_seconds=120)
    state, cur = PolicyState(), Replicas(5, 2)
    for t in range(0, 600, 15):  # steady: the recommendation is the current size
        d = decide(window(met=100, backlog=0.5 * spec.backlog_target_tokens), cur, spec, state, now=t)
        assert d.desired_prefill == 5
    d = decide(idle(), cur, spec, state, now=615)  # one idle window
    assert d.desired_prefill == 5
    assert "stabilizing" in d.reason


def test_bounds():
    spec = replace(SPEC, prefill_max_replicas=3, max_step=10)
    d = decide(
        window(met=0, backlog=100 * spec.backlog_target_tokens), Replicas(2, 1), spec, PolicyState(), now=0
    )
    assert d.desired_prefill == 3
    # Current below the minimum (the spec changed): raised at once, cooldown or not.
    state = PolicyState(last_change={"prefill": 0.0, "decode": 0.0})
    d = decide(window(), Replicas(1, 1), replace(spec, prefill_min_replicas=2), state, now=1)
    assert d.desired_prefill == 2
    # Idle forever never goes below the minimum.
    state, cur = PolicyState(), Replicas(3, 3)
    for t in range(0, 3000, 15):
        d = decide(idle(), cur, replace(spec, prefill_min_replicas=2, decode_min_replicas=2), state, now=t)
        cur = Replicas(d.desired_prefill, d.desired_decode)
    assert cur == Replicas(2, 2)


def test_cooldown_after_a_change():
    state = PolicyState()
    bad = window(met=0, backlog=10 * SPEC.backlog_target_tokens)
    d1 = decide(bad, Replicas(1, 1), SPEC, state, now=100)
    assert d1.desired_prefill == 3
    ready = Replicas(3, 1)
    d2 = decide(bad, ready, SPEC, state, now=130)
    assert d2.desired_prefill == 3 and "cooldown (30s left)" in d2.reason
    d3 = decide(bad, ready, SPEC, state, now=100 + SPEC.cooldown_seconds)
    assert d3.desired_prefill == 5


def test_max_step_limits_each_change():
    for step in (1, 3):
        spec = replace(SPEC, max_step=step)
        d = decide(
            window(met=0, backlog=100 * spec.backlog_target_tokens), Replicas(2, 2), spec, PolicyState(), 0
        )
        assert d.desired_prefill == 2 + step
    spec = replace(SPEC, max_step=3, max_step_down=1, stabilization_seconds=0, cooldown_seconds=0)
    d = decide(idle(), Replicas(8, 1), spec, PolicyState(), now=0)
    assert d.desired_prefill == 7


def test_ratio_band_raises_the_lagging_pool():
    spec = replace(SPEC, ratio_min=1.0, ratio_max=2.0)
    # Prefill must grow (TTFT misses) to 3 with decode at 1: P/D = 3 > 2, so decode is raised to 2.
    d = decide(window(met=60, ttft=40), Replicas(2, 1), spec, PolicyState(), now=1000)
    assert d.desired_prefill == 3
    assert d.desired_decode == 2
    assert "ratio band" in d.reason
    # Decode must grow past prefill: P/D < 1, so prefill is raised along.
    d = decide(window(met=60, tpot=40), Replicas(2, 2), spec, PolicyState(), now=1000)
    assert d.desired_decode == 3 and d.desired_prefill == 3


def test_ratio_band_lowers_the_other_pool_when_the_lagging_one_is_at_its_max():
    spec = replace(SPEC, ratio_min=0.5, ratio_max=1.0, decode_max_replicas=2, max_step=4)
    d = decide(
        window(met=0, backlog=100 * spec.backlog_target_tokens), Replicas(2, 2), spec, PolicyState(), 0
    )
    assert (d.desired_prefill, d.desired_decode) == (2, 2)


def test_replicas_still_starting_do_not_ratchet_slo_scale_ups():
    """Misses measured before new replicas are ready do not add more replicas on top of them."""
    spec = replace(SPEC, cooldown_seconds=0)
    state = PolicyState()
    bad = window(met=10, ttft=90)
    d = decide(bad, Replicas(2, 1), spec, state, now=0)
    assert d.desired_prefill == 4
    for t in (15, 30, 45):  # the 2 new ones start for 60 s; the window still shows the old misses
        d = decide(bad, Replicas(4, 1, prefill_ready=2), spec, state, now=t)
        assert d.desired_prefill == 4, d.reason
    for t in (60, 90, 105):  # all ready at 60; until a whole window later, the misses predate them
        d = decide(bad, Replicas(4, 1), spec, state, now=t)
        assert d.desired_prefill == 4, d.reason
    d = decide(bad, Replicas(4, 1), spec, state, now=60 + spec.window_seconds)  # misses at 4: more
    assert d.desired_prefill == 6


def test_from_spec_reads_the_crd_field_names():
    spec = AutoscalingSpec.from_spec(
        {
            "prefill": {"replicas": 2, "minReplicas": 1, "maxReplicas": 8},
            "decode": {"replicas": 3},
            "slo": {"ttftMs": 500, "tpotMs": 50, "attainment": 0.95},
            "autoscaling": {
                "enabled": True,
                "windowSeconds": 30,
                "stabilizationSeconds": 120,
                "cooldownSeconds": 20,
                "maxStep": 2,
                "prefillDecodeRatio": {"min": 0.5, "max": 2},
            },
        },
        min_requests=5,
    )
    assert spec.bounds("prefill") == (1, 8)
    assert spec.bounds("decode") == (3, 3)  # bounds default to replicas
    assert (spec.ttft_ms, spec.tpot_ms, spec.attainment) == (500, 50, 0.95)
    assert (spec.window_seconds, spec.stabilization_seconds, spec.cooldown_seconds, spec.max_step) == (
        30,
        120,
        20,
        2,
    )
    assert (spec.ratio_min, spec.ratio_max, spec.min_requests) == (0.5, 2.0, 5)


def test_from_spec_matches_the_operator_api_model():
    api = pytest.importorskip("tandem_operator.api")
    md = api.ModelDeploymentSpec(
        model={"builtin": "smollm2-135m"},
        image="tandem:dev",
        prefill={"replicas": 2, "minReplicas": 1, "maxReplicas": 6},
        decode={"replicas": 1, "maxReplicas": 4},
        slo={"ttftMs": 800, "tpotMs": 80},
        autoscaling={"enabled": True, "maxStep": 3, "prefillDecodeRatio": {"min": 1, "max": 3}},
    )
    spec = AutoscalingSpec.from_spec(md.model_dump(by_alias=True, mode="json"))
    assert spec.bounds("prefill") == (1, 6) and spec.bounds("decode") == (1, 4)
    assert (spec.ttft_ms, spec.tpot_ms, spec.max_step) == (800, 80, 3)
    assert (spec.ratio_min, spec.ratio_max) == (1.0, 3.0)
    assert spec.stabilization_seconds == md.autoscaling.stabilization_seconds


def test_spec_validation():
    with pytest.raises(ValueError):
        AutoscalingSpec(prefill_min_replicas=3, prefill_max_replicas=2)
    with pytest.raises(ValueError):
        AutoscalingSpec(ratio_min=1.0)


def test_decision_records_its_inputs():
    d = decide(window(met=60, ttft=40), Replicas(2, 2), SPEC, PolicyState(), now=1000)
    assert d.inputs["finished"] == 100
    assert d.inputs["attainment"] == pytest.approx(0.6)
    assert d.inputs["window"]["missed_ttft"] == 40
    assert d.inputs["prefill_recommendation"] >= 3


def test_prefill_throughput_is_learned_from_busy_time():
    spec = replace(SPEC, max_step=10, target_utilization=1.0, capacity_smoothing=0.5)
    state = PolicyState()
    # Too few requests: the measurement does not count.
    decide(window(met=5, prefill_tokens_per_busy_s=2_000.0), Replicas(1, 1), spec, state, now=0)
    assert state.prefill_capacity is None
    decide(window(prefill_tokens_per_busy_s=10_000.0), Replicas(1, 1), spec, state, now=15)
    decide(window(prefill_tokens_per_busy_s=12_000.0), Replicas(1, 1), spec, state, now=30)
    assert state.prefill_capacity == pytest.approx(11_000.0)
    # Then the peak arrival rate sizes prefill, as with a declared throughput.
    d = decide(window(prompt_tokens_per_s_peak=50_000.0), Replicas(1, 1), spec, state, now=45)
    assert d.desired_prefill == 5 and "(learned)" in d.reason
    # Turned off, or without the measurement: the backlog rule (no absolute size).
    state2 = PolicyState()
    off = replace(spec, learn_capacity=False)
    decide(window(prefill_tokens_per_busy_s=10_000.0), Replicas(1, 1), off, state2, now=0)
    d = decide(window(prompt_tokens_per_s_peak=50_000.0), Replicas(1, 1), off, state2, now=15)
    assert state2.prefill_capacity is None and d.desired_prefill == 1


def test_the_package_needs_only_the_standard_library():
    """The operator image and `tandem up` import it: no numpy, torch, pydantic, grpc, kopf, ..."""
    import subprocess
    import sys

    code = (
        "import sys, tandem_operator.autoscaling, tandem_operator.autoscaling.scrape;"
        "heavy = {'numpy', 'torch', 'pydantic', 'grpc', 'kopf', 'yaml', 'aiohttp', 'prometheus_client',"
        " 'tandem_worker'};"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- burst-aware prefill sizing

BURSTY = replace(
    SPEC,
    prefill_tokens_per_second=10_000,
    target_utilization=1.0,
    max_step=10,
    burst_horizon_seconds=600,
    startup_seconds=60,
    attainment_feedback=False,  # the memory at its nominal quantile (the feedback: tests below)
)


def quiet(rate: float = 0.0) -> MetricsWindow:
    """Nothing running or queued; the router measured `rate` (0: idle)."""
    if rate:
        return window(prompt_tokens_per_s=rate / 2, prompt_tokens_per_s_peak=rate)
    return window(met=0, backlog=0.0, kv=0.0, running=0.0, prompt_tokens_per_s_peak=0.0)


def run_burst_then(spec, after, until, state=None, step=15):
    """A 50k tok/s burst for 2 minutes, then `after(t)` windows; the prefill size at each time."""
    state = state or PolicyState()
    cur, sizes = Replicas(1, 1), {}
    for t in range(0, until, step):
        w = window(prompt_tokens_per_s=30_000, prompt_tokens_per_s_peak=50_000) if t <= 120 else after(t)
        d = decide(w, cur, spec, state, now=t)
        cur = Replicas(d.desired_prefill, d.desired_decode)
        sizes[t] = cur.prefill
    return sizes, state, d


@pytest.mark.parametrize("rate", [0.0, 5_000.0])  # idle, or a trickle that one replica serves
def test_a_recent_burst_keeps_prefill_capacity(rate):
    sizes, _, d = run_burst_then(BURSTY, lambda t: quiet(rate), until=601)
    assert max(sizes.values()) == 5
    assert all(sizes[t] == 5 for t in sizes if t >= 60), sizes  # held through the whole horizon
    assert "burst memory" in d.reason
    # Without the memory (the last window alone), the same history is back at 1 well before that.
    sizes0, _, _ = run_burst_then(replace(BURSTY, burst_horizon_seconds=0), lambda t: quiet(rate), until=601)
    assert sizes0[600] == 1


def test_the_burst_memory_decays_after_the_horizon():
    spec = BURSTY
    sizes, state, d = run_burst_then(spec, lambda t: quiet(5_000.0), until=1500)
    # The burst leaves the horizon (less than 1 - quantile of it) about 600 s after it ended;
    # then stabilization, and the prefill is back to what the trickle needs.
    down = min(t for t in sizes if t > 120 and sizes[t] < 5)
    assert 600 < down <= 120 + spec.burst_horizon_seconds + spec.stabilization_seconds + 15
    assert sizes[1485] == 1
    assert all(t >= 1485 - spec.burst_horizon_seconds - spec.startup_seconds for t, _ in state.rates)


def test_a_single_short_spike_is_not_sized_for_at_the_default_quantile():
    """Time-weighted: a spike seen for one decision in ten minutes is above the 90% quantile."""

    def after_spike(spec):
        state, cur = PolicyState(), Replicas(1, 1)
        for t in range(0, 615, 15):
            d = decide(quiet(100_000.0 if t == 300 else 10_000.0), cur, spec, state, now=t)
            cur = Replicas(d.desired_prefill, d.desired_decode)
        return d.desired_prefill

    assert after_spike(BURSTY) == 10  # held by stabilization after the spike ...
    fast = replace(BURSTY, stabilization_seconds=0, cooldown_seconds=0)
    assert after_spike(fast) == 1  # ... but the memory alone sizes for 10k tok/s again
    assert after_spike(replace(fast, burst_quantile=1.0)) == 10  # the maximum of the horizon does not


def test_headroom_for_the_rate_growth_over_a_cold_start():
    """The rate grew by 20k tok/s within a startup: a replica started now must meet 20k more."""

    def last(spec):
        state, cur = PolicyState(), Replicas(1, 1)
        for t in range(0, 150, 15):
            d = decide(quiet(0.0 if t < 135 else 20_000.0), cur, spec, state, now=t)
            cur = Replicas(d.desired_prefill, d.desired_decode)
        return d

    d = last(BURSTY)
    assert d.desired_prefill == 4 and "growth over a 60s startup +20000" in d.reason
    assert last(replace(BURSTY, burst_horizon_seconds=0)).desired_prefill == 2  # this window alone


@pytest.mark.parametrize("startup", [0.0, 5.0, 30.0])
def test_the_rate_growth_is_measured_over_at_least_a_window(startup):
    """Replicas that start in seconds still get headroom for a burst that builds over a minute.

    The peak rate climbs 10k tok/s per 15 s decision to 40k, then falls back, every 2 minutes.
    Measured one decision apart (the least a short startup allows), every rise is +10k; a window
    apart, the whole rise (+40k) shows, as it does to a replica that starts 60 s late."""

    spec = replace(BURSTY, startup_seconds=startup)
    state, cur = PolicyState(), Replicas(1, 1)
    for t in range(0, 600, 15):
        rate = 10_000.0 * (((t // 15) % 8) - 3) if (t // 15) % 8 > 3 else 0.0  # 0 x4, then 10k..40k
        d = decide(quiet(rate), cur, spec, state, now=t)
        cur = Replicas(d.desired_prefill, d.desired_decode)
    assert f"growth over a 60s window (startup {startup:.0f}s) +40000" in d.reason
    assert d.desired_prefill == 8  # 40k now + 40k of growth, at 10k tok/s per replica


def test_the_startup_time_is_measured_from_the_last_scale_up():
    spec = replace(BURSTY, startup_seconds=None)
    state = PolicyState()
    d = decide(quiet(30_000.0), Replicas(1, 1), spec, state, now=0)
    assert d.desired_prefill == 3
    decide(quiet(30_000.0), Replicas(1, 1), spec, state, now=5)  # not applied yet: nothing to time
    assert state.startup_s is None
    for t in (15, 30, 45, 60):
        decide(quiet(30_000.0), Replicas(3, 1, prefill_ready=1, decode_ready=1), spec, state, now=t)
        assert state.startup_s is None
    decide(quiet(30_000.0), Replicas(3, 1, prefill_ready=3, decode_ready=1), spec, state, now=75)
    assert state.startup_s == 75  # (the first decision that saw all 3 ready)
    # A growth after that is measured over the 75 s it takes, not the 60 s assumed before.
    d = decide(quiet(60_000.0), Replicas(3, 1), spec, state, now=90)
    assert "75s startup" in d.reason
    # Declared, it is not measured over.
    assert "60s startup" in decide(quiet(90_000.0), Replicas(3, 1), BURSTY, state, now=105).reason


def test_missing_data_after_a_burst_still_means_no_decision():
    _, state, _ = run_burst_then(BURSTY, lambda t: quiet(5_000.0), until=136)
    remembered = list(state.rates)
    for w in (None, MetricsWindow(duration_s=60)):
        for t in range(150, 3000, 15):  # long past the horizon, stabilization and cooldown
            d = decide(w, Replicas(5, 1), BURSTY, state, now=t)
            assert (d.desired_prefill, d.desired_decode) == (5, 1)
            assert d.no_data == ("prefill", "decode")
    assert list(state.rates) == remembered  # no samples added, none dropped, none used
    # A window with pool data but no rate measurement neither feeds the memory nor uses it.
    d = decide(window(met=100), Replicas(5, 1), BURSTY, state, now=3000)
    assert list(state.rates) == remembered and "burst memory" not in d.reason


def test_burst_spec_validation():
    with pytest.raises(ValueError):
        AutoscalingSpec(burst_quantile=0.0)
    with pytest.raises(ValueError):
        AutoscalingSpec(burst_horizon_seconds=-1)
    assert AutoscalingSpec(attainment=0.95).rate_quantile == 0.95
    assert AutoscalingSpec(burst_quantile=0.5).rate_quantile == 0.5


# -- attainment feedback on the burst headroom

FEEDBACK = replace(BURSTY, attainment_feedback=True, stabilization_seconds=0, cooldown_seconds=0)


def outcome_window(rate: float, met: int, ttft: int = 0, tpot: int = 0) -> MetricsWindow:
    """A window at `rate` tok/s (peak) whose finished requests met or missed their SLOs as given."""
    return window(met=met, ttft=ttft, tpot=tpot, prompt_tokens_per_s=rate / 2, prompt_tokens_per_s_peak=rate)


def after_a_spike(spec, met: int, ttft: int, step: int = 15, tpot: int = 0):
    """10k tok/s with one 100k tok/s spike at t=300, every window with these outcomes."""
    state, cur = PolicyState(), Replicas(1, 1)
    for t in range(0, 601, step):
        w = outcome_window(100_000.0 if t == 300 else 10_000.0, met, ttft, tpot)
        d = decide(w, cur, spec, state, now=t)
        cur = Replicas(d.desired_prefill, d.desired_decode)
    return d, state


def test_attainment_above_target_relaxes_the_burst_headroom():
    # Every request met over the horizon: none of the miss budget used, no headroom.
    d, state = after_a_spike(FEEDBACK, met=100, ttft=0)
    assert state.burst_q == 0.0 and d.inputs["burst_quantile"] == 0.0
    assert "100.0% attained over 600s" in d.inputs["attainment_feedback"]
    assert d.inputs["prefill_sized_rate"] == 10_000  # this window's peak alone
    # Half the budget used (95% against 90%): half the nominal quantile.
    _, state = after_a_spike(FEEDBACK, met=95, ttft=5)
    assert state.burst_q == pytest.approx(0.45)
    # A burst the memory held capacity for, all met: the size comes back down before the horizon
    # has passed (without the feedback it is held through the whole horizon).
    sizes, _, _ = run_burst_then(FEEDBACK, lambda t: quiet(5_000.0), until=601)
    assert max(sizes.values()) == 5 and sizes[300] == 1
    sizes0, _, _ = run_burst_then(
        replace(FEEDBACK, attainment_feedback=False), lambda t: quiet(5_000.0), until=601
    )
    assert sizes0[300] == 5


def test_attainment_below_target_tightens_the_burst_headroom():
    # 85% attained against 90%: the quantile goes up to the highest remembered peak, so the spike
    # (one decision in ten minutes, above the nominal 90% quantile) is sized for.
    d, state = after_a_spike(FEEDBACK, met=85, ttft=15)
    assert state.burst_q == 1.0
    assert d.inputs["prefill_sized_rate"] == 100_000
    d0, _ = after_a_spike(replace(FEEDBACK, attainment_feedback=False), met=85, ttft=15)
    assert d0.inputs["prefill_sized_rate"] == 10_000
    assert "burst_quantile" not in d0.inputs


def test_tpot_misses_do_not_tighten_the_prefill_headroom():
    # 85% attained, but every miss is a TPOT miss: decode's to fix, so prefill sees all TTFTs met.
    _, state = after_a_spike(FEEDBACK, met=85, ttft=0, tpot=15)
    assert state.burst_q == 0.0
    _, state = after_a_spike(FEEDBACK, met=85, ttft=10, tpot=5)  # 90% met their TTFT: the target
    assert state.burst_q == pytest.approx(0.9)


def test_prefill_rejections_tighten_the_burst_headroom_and_decode_rejections_do_not():
    """Attainment feedback counts against prefill only what prefill sizing can fix: its own
    rejections, like TTFT misses, but not decode's (like TPOT misses)."""
    spec = replace(SPEC, attainment_feedback=True, prefill_tokens_per_second=10_000.0)
    rate = dict(prompt_tokens_per_s=1000.0, prompt_tokens_per_s_peak=1000.0)
    by_pool = {}
    for pool in ("prefill", "decode"):
        state = _settled_state()
        w = window(met=80, rejected=20, prefill_rejected=20 if pool == "prefill" else 0, **rate)
        d = decide(w, Replicas(3, 3), spec, state, now=0)
        by_pool[pool] = d.inputs["burst_quantile"]
    assert by_pool["prefill"] == 1.0  # 80% realized against 90%: the most headroom
    assert by_pool["decode"] == 0.0  # none of prefill's miss budget used: no headroom


def test_attainment_at_target_keeps_the_nominal_quantile():
    _, state = after_a_spike(FEEDBACK, met=90, ttft=10)
    assert state.burst_q == pytest.approx(0.9)
    _, state = after_a_spike(replace(FEEDBACK, burst_quantile=0.6), met=90, ttft=10)
    assert state.burst_q == pytest.approx(0.6)


def test_attainment_feedback_does_not_depend_on_how_often_decide_runs():
    _, every15 = after_a_spike(FEEDBACK, met=95, ttft=5, step=15)
    _, every5 = after_a_spike(FEEDBACK, met=95, ttft=5, step=5)
    assert every5.burst_q == pytest.approx(every15.burst_q)
    # Overlapping windows count for their new part only: calls every 20 s on 60 s windows, all with
    # 100 finished requests, all met for the first 5 minutes and 80 met for the next 5.
    state = PolicyState()
    for t in range(0, 600, 20):
        decide(
            outcome_window(10_000.0, 100 if t < 300 else 80, 0 if t < 300 else 20),
            Replicas(1, 1),
            FEEDBACK,
            state,
            now=t,
        )
    # At t=580 the horizon starts at -20: the first window (-60, 0] counts only its last 20 s, as
    # every later one does: (15 x 100 + 15 x 80) met of 30 x 100 finished = 90%, the target.
    assert state.burst_q == pytest.approx(0.9)


def test_attainment_feedback_forgets_what_left_the_horizon():
    # A window of misses at t=0, then all met every 15 s: once the horizon has moved 40 s past that
    # window's start, only its last 20 s count (a third of its misses), not the whole window.
    state = PolicyState()
    decide(outcome_window(10_000.0, 0, 100), Replicas(1, 1), FEEDBACK, state, now=0)
    for t in range(15, 601, 15):
        decide(outcome_window(10_000.0, 100), Replicas(1, 1), FEEDBACK, state, now=t)
    # At t=600 the horizon is (0, 600]: the window ending at 0 is wholly outside it.
    assert state.burst_q == 0.0
    state = PolicyState()
    decide(outcome_window(10_000.0, 0, 100), Replicas(1, 1), FEEDBACK, state, now=0)
    for t in range(15, 586, 15):
        decide(outcome_window(10_000.0, 100), Replicas(1, 1), FEEDBACK, state, now=t)
    # At t=585 the horizon starts at -15: 15 s of the missed window count (25 misses), then 39
    # windows of 15 new seconds each (39 x 25 met): 975 of 1,000 = 97.5%.
    assert state.burst_q == pytest.approx(0.9 * (1 - 0.75))


def test_no_data_no_attainment_feedback():
    # Fewer than min_requests finished over the whole horizon: the nominal quantile stays.
    d, state = after_a_spike(FEEDBACK, met=0, ttft=0)
    assert state.burst_q is None and "attainment_feedback" not in d.inputs
    # Learned, then windows without outcome counts (or none at all): no change, no samples.
    _, state = after_a_spike(FEEDBACK, met=95, ttft=5)
    q, outcomes = state.burst_q, list(state.outcomes)
    for w in (None, MetricsWindow(duration_s=60, prompt_tokens_per_s_peak=10_000.0)):
        d = decide(w, Replicas(1, 1), FEEDBACK, state, now=615)
        assert state.burst_q == q and list(state.outcomes) == outcomes
        assert "attainment_feedback" not in d.inputs
    # Idle windows (no requests) neither relax nor tighten it, even once the horizon has passed.
    for t in range(615, 1500, 15):
        decide(quiet(0.0), Replicas(1, 1), FEEDBACK, state, now=t)
    assert state.burst_q == q
    assert all(t >= 1485 - FEEDBACK.burst_horizon_seconds for t, _, _ in state.outcomes)


def test_attainment_feedback_off_without_a_horizon_or_when_disabled():
    for spec in (replace(FEEDBACK, burst_horizon_seconds=0), replace(FEEDBACK, attainment_feedback=False)):
        d, state = after_a_spike(spec, met=85, ttft=15)
        assert state.burst_q is None and not state.outcomes and "attainment_feedback" not in d.inputs


def test_a_state_restored_from_json_decides_exactly_as_the_original():
    # The operator saves the state in status and a restarted operator carries on from it: after a
    # round trip through JSON every later decision must be the one the original state would make.
    # The run covers every part of the state: a learned capacity, the burst memory, outcomes and the
    # feedback quantile, a measured startup, replicas still starting (settled = inf), stabilization.
    spec = replace(FEEDBACK, stabilization_seconds=120, cooldown_seconds=30, learn_capacity=True)
    state, cur = PolicyState(), Replicas(1, 1)

    def w_at(t: int) -> MetricsWindow:
        rate = 60_000.0 if 120 <= t <= 240 else 8_000.0
        met, ttft = (70, 30) if 120 <= t <= 240 else (100, 0)
        return replace(outcome_window(rate, met, ttft), prefill_tokens_per_busy_s=12_000.0)

    def step(st: PolicyState, cur: Replicas, t: int, sizes: dict[int, int]) -> tuple[Replicas, Decision]:
        d = decide(w_at(t), cur, spec, st, now=1_000_000 + t)
        sizes[t] = d.desired_prefill
        # A replica serves 45 s after it was asked for: ready = the size asked for 45 s ago.
        ready = min(d.desired_prefill, sizes.get(t - 45, 1))
        return Replicas(d.desired_prefill, d.desired_decode, prefill_ready=ready), d

    sizes: dict[int, int] = {}
    t = 0
    while t < 150 or not state.scaling_up:  # stop while replicas are starting (settled = inf)
        cur, _ = step(state, cur, t, sizes)
        t += 15
    assert state.rates and state.outcomes and state.prefill_capacity and state.burst_q is not None
    assert state.settled["prefill"] == float("inf")
    text = state.to_json()
    restored = PolicyState.from_json(text)
    assert json.loads(restored.to_json()) == json.loads(text)
    a, b, sizes_b = cur, cur, dict(sizes)
    changes = 0
    for t in range(t, t + 900, 15):  # noqa: B020 - goes on from where the first run stopped
        a, da = step(state, a, t, sizes)
        b, db = step(restored, b, t, sizes_b)
        assert (da.desired_prefill, da.desired_decode, da.reason) == (
            db.desired_prefill,
            db.desired_decode,
            db.reason,
        )
        changes += sizes[t] != sizes[t - 15]
    assert changes >= 2  # the run after the restore scales (up, and back down after the burst)
    assert json.loads(state.to_json()) == json.loads(restored.to_json())


@pytest.mark.parametrize("text", ["", "[]", '{"v": 99}', '{"v": 1, "history": 3}', "{not json"])
def test_a_state_of_another_layout_is_refused(text):
    with pytest.raises(ValueError):
        PolicyState.from_json(text)


def _settled_state() -> PolicyState:
    # Started long ago, no change yet: neither stabilization nor cooldown stands between a
    # recommendation and the decision.
    return PolicyState(started=-10_000.0)


def test_a_window_of_failed_requests_holds_both_pools():
    """Every request failed (attainment 0): no pool is to blame, and none may read it as room."""
    comfortable = decide(window(met=500), Replicas(3, 3), SPEC, _settled_state(), now=0)
    assert (comfortable.desired_prefill, comfortable.desired_decode) == (2, 2)  # the same load, served

    state, cur = _settled_state(), Replicas(3, 3)
    for t in range(0, 1800, 15):
        d = decide(window(met=0, failed=500), cur, SPEC, state, now=t)
        assert (d.desired_prefill, d.desired_decode) == (3, 3), d.reason
        assert d.no_data == ()  # a decision, not a lack of data
    assert d.reason == (
        "prefill 3->3: 500 of 500 requests failed: holding; decode 3->3: 500 of 500 requests failed: holding"
    )


def test_failures_count_against_the_scale_down_margin():
    # allowed 10%, down margin half of it: 5% of the window may go unserved or missed.
    d = decide(window(met=96, failed=4), Replicas(3, 3), SPEC, _settled_state(), now=0)
    assert (d.desired_prefill, d.desired_decode) == (2, 2)
    d = decide(window(met=94, failed=6), Replicas(3, 3), SPEC, _settled_state(), now=0)
    assert (d.desired_prefill, d.desired_decode) == (3, 3)
    assert "6 of 100 requests failed: holding" in d.reason
    # Within the margin each, over it together with the pool's own misses.
    d = decide(window(met=94, ttft=3, failed=3), Replicas(3, 3), SPEC, _settled_state(), now=0)
    assert d.desired_prefill == 3 and "prefill 3->3: 3 of 100 requests failed: holding" in d.reason
    assert d.desired_decode == 2


def test_failures_scale_nothing_up():
    d = decide(window(met=40, failed=60), Replicas(2, 2), SPEC, _settled_state(), now=0)
    assert (d.desired_prefill, d.desired_decode) == (2, 2)
    # A pool's few misses beside many failures: the attainment is low, but only through the
    # failures, which are no pool's; the misses alone (5%) are within the allowed 10%.
    d = decide(window(met=40, tpot=5, failed=55), Replicas(2, 2), SPEC, _settled_state(), now=0)
    assert (d.desired_prefill, d.desired_decode) == (2, 2), d.reason
    d = decide(window(met=40, ttft=5, failed=55), Replicas(2, 2), SPEC, _settled_state(), now=0)
    assert (d.desired_prefill, d.desired_decode) == (2, 2), d.reason


def test_rejected_requests_scale_decode_up_and_hold_prefill():
    """Rejections no pool is named for (every decode KV cache full; a router older than the pool
    counter) are decode's misses; they never reached prefill, which must not shrink."""
    w = window(met=60, rejected=40)
    d = decide(w, Replicas(3, 3), SPEC, _settled_state(), now=0)
    assert d.desired_decode > 3
    assert d.desired_prefill == 3
    assert "decode 3->4: decode rejections 40% of 100 requests" in d.reason
    assert "prefill 3->3: 40 of 100 requests rejected by decode: holding" in d.reason
    d = decide(window(met=50, failed=10, rejected=40), Replicas(3, 3), SPEC, _settled_state(), now=0)
    assert "prefill 3->3: 10 of 100 requests failed, 40 rejected by decode: holding" in d.reason


def test_requests_the_prefill_workers_turned_away_scale_prefill_up_and_hold_decode():
    """Every prefill worker at its request limit: TTFT-side pressure, prefill's to fix. Read as
    decode's (as every rejection was), decode grew while prefill, the bottleneck, stayed."""
    w = window(met=60, rejected=40, prefill_rejected=40)
    d = decide(w, Replicas(3, 3), SPEC, _settled_state(), now=0)
    assert (d.desired_prefill, d.desired_decode) == (4, 3), d.reason
    assert "prefill 3->4: prefill rejections 40% of 100 requests > allowed 10%" in d.reason
    # Decode reserved their KV and gave it back: demand it never served, which holds it from shrinking.
    assert "decode 3->3: 40 of 100 requests rejected by prefill: holding" in d.reason
    # With TTFT misses beside them, both are prefill's: 6% + 6% is over the allowed 10%.
    d = decide(
        window(met=88, ttft=6, rejected=6, prefill_rejected=6), Replicas(3, 3), SPEC, _settled_state(), 0
    )
    assert d.desired_prefill > 3 and "TTFT misses and prefill rejections 12% of 100" in d.reason
    # Still prefill's while decode's KV is saturated: a decode worker reserves a request's KV before
    # it asks prefill, so these had theirs (the TTFT misses go to decode then, as they waited for KV).
    w = window(met=60, ttft=10, rejected=30, prefill_rejected=30, kv=0.95, waiting=5.0)
    d = decide(w, Replicas(3, 3), SPEC, _settled_state(), 0)
    assert "prefill 3->4: prefill rejections 30% of 100 requests" in d.reason, d.reason
    # Counted apart, decode's are what the router says, not what the others leave: increase()
    # extrapolates each series on its own, and 5 left over would be no decode rejection.
    w = window(met=60, rejected=40, prefill_rejected=35, decode_rejected=0)
    assert (w.rejected_by_prefill, w.rejected_by_decode) == (35, 0)
    # Both pools in one window: each pool's own rejections are its misses.
    d = decide(window(met=70, rejected=30, prefill_rejected=15), Replicas(3, 3), SPEC, _settled_state(), 0)
    assert d.desired_prefill > 3 and d.desired_decode > 3, d.reason
    assert "prefill rejections 15%" in d.reason and "decode rejections 15%" in d.reason
    # Within the SLO otherwise, prefill's rejections hold it from scaling down: they are its misses.
    w = window(met=94, rejected=6, prefill_rejected=6)
    d = decide(w, Replicas(3, 3), SPEC, _settled_state(), 0)
    assert "prefill 3->3: prefill rejections 6% not below 50% of allowed: holding" in d.reason


def test_requests_the_router_turned_away_at_its_own_limit_scale_no_pool_up():
    """The router at its in-flight limit is no decode miss: with the pools in their SLOs and room to
    spare, more decode would not be sent more work. The rejections still hold both pools from
    shrinking (demand neither saw), and the pools' own misses count over the requests they served."""
    w = window(met=60, rejected=40, router_rejected=40)
    d = decide(w, Replicas(3, 3), SPEC, _settled_state(), now=0)
    assert (d.desired_prefill, d.desired_decode) == (3, 3), d.reason
    assert "decode 3->3: 40 of 100 requests turned away at the router's in-flight limit: holding" in d.reason
    assert "prefill 3->3: 40 of 100 requests turned away at the router's in-flight limit: holding" in d.reason
    assert "router: 40 of 100 requests turned away at its in-flight limit" in d.reason
    # Told apart from a full decode KV cache in the same window: only those are decode's misses.
    d = decide(window(met=60, rejected=40, router_rejected=30), Replicas(3, 3), SPEC, _settled_state(), 0)
    assert d.desired_decode > 3 and "decode rejections 14% of 70 requests" in d.reason
    # Decode missing its SLO on 9 of the 60 requests it served is decode's to fix, however many the
    # router turned away (as a fraction of all 100 finished, 9% would be within the allowed 10%).
    w = window(met=51, tpot=9, rejected=40, router_rejected=40)
    d = decide(w, Replicas(3, 3), SPEC, _settled_state(), 0)
    assert d.desired_decode > 3 and "TPOT misses 15% of 60 requests" in d.reason


def test_failures_hold_prefill_sized_by_its_throughput():
    """The absolute sizing reads the arrival rate, which failed requests' prompts never reach."""
    spec = replace(SPEC, prefill_tokens_per_second=10_000.0, burst_horizon_seconds=0)
    low = dict(prompt_tokens_per_s=1000.0, prompt_tokens_per_s_peak=1000.0)
    d = decide(window(met=100, **low), Replicas(3, 3), spec, _settled_state(), now=0)
    assert d.desired_prefill == 1 and "fits 1" in d.reason
    d = decide(window(met=0, failed=100, **low), Replicas(3, 3), spec, _settled_state(), now=0)
    assert d.desired_prefill == 3 and "100 of 100 requests failed: holding" in d.reason


def test_the_memory_of_two_second_steps_at_the_widest_windows_fits_the_status_field():
    """The saved memory grows with window and stabilization over the step interval; the status field
    (and the autoscaler's guard before it writes) must hold it for any interval a user may choose
    down to 2 s, or the API server refuses the whole status patch."""
    from tandem_operator import api

    spec = AutoscalingSpec(
        prefill_min_replicas=1, prefill_max_replicas=8, decode_min_replicas=1, decode_max_replicas=8,
        window_seconds=3600, stabilization_seconds=3600,
    )  # fmt: skip
    state, now, p, d = PolicyState(), 1.7e9, 2, 2
    rng = random.Random(0)
    for _ in range(int(8000 / 2)):
        w = MetricsWindow(
            duration_s=3600, met=100, missed_ttft=1, missed_tpot=1, failed=0,
            prefill_backlog_tokens=rng.random() * 10, decode_kv_usage=rng.random() * 0.5,
            prompt_tokens_per_s=rng.random() * 5000, prompt_tokens_per_s_peak=rng.random() * 9000,
            decode_running=3.0, decode_waiting=0.0, prefill_running=1.0, prefill_waiting=0.0,
        )  # fmt: skip
        dec = decide(w, Replicas(p, d, p, d), spec, state, now)
        p, d = dec.desired_prefill, dec.desired_decode
        now += 2
    size = len(state.to_json())
    assert 65536 < size <= api.MAX_AUTOSCALER_MEMORY_BYTES, size  # past the old 64 KiB bound
    assert PolicyState.from_json(state.to_json()).to_json() == state.to_json()


def test_misses_while_a_replica_never_gets_ready_hold_the_pool_down():
    """A replica stuck Pending (or crash-looping) keeps the pool unsettled: its misses must not size
    it up, but neither may the zeroed misses read as room to spare (it cycled down and back up)."""
    bad = window(met=10, ttft=50, tpot=40)
    state, cur = PolicyState(), Replicas(3, 3, prefill_ready=2, decode_ready=2)
    for t in range(0, 900, 15):
        d = decide(bad, cur, SPEC, state, now=t)
        assert (d.desired_prefill, d.desired_decode) == (3, 3), (t, d.reason)
    assert "TTFT misses 50% not below 50% of allowed (2 of 3 ready" in d.reason
    assert "TPOT misses 40% not below 50% of allowed (2 of 3 ready" in d.reason
    assert d.no_data == ()
    # Settled, the same window scales both up.
    d = decide(bad, Replicas(3, 3), SPEC, _settled_state(), now=0)
    assert d.desired_prefill > 3 and d.desired_decode > 3


def kv_window(mean: float, busiest: float, waiting: float = 0.0, **kw) -> MetricsWindow:
    return replace(window(kv=mean, waiting=waiting, **kw), decode_kv_usage_max=busiest)


def test_one_replica_full_of_a_long_context_does_not_size_decode():
    """The busiest replica's KV is no measure of the pool: more replicas would not relieve it."""
    spec = replace(SPEC, decode_max_replicas=16, max_step=4)
    for waiting, size in ((0.0, 2), (0.5, 3)):
        # One replica at 90%, the others at 10%; every request served. With requests waiting, it
        # adds one above what the mean sizes, once (not one per decision), and keeps it.
        state, cur, reasons = PolicyState(), Replicas(2, 2), set()
        for t in range(0, 1200, 15):
            mean = (0.9 + 0.1 * (cur.decode - 1)) / cur.decode
            d = decide(kv_window(mean, 0.9, waiting=waiting), cur, spec, state, now=t)
            cur = Replicas(d.desired_prefill, d.desired_decode)
            reasons.add(next(r for r in d.reason.split("; ") if r.startswith("decode ")))
            assert cur.decode <= size, (t, d.reason)
        assert cur.decode == size, reasons
    assert "decode 2->3: busiest decode KV usage 90% (mean 0.5) with 0.5 waiting: one more" in reasons
    assert "decode 3->3: busiest decode KV usage 90% with 0.5 waiting: holding" in reasons
    # The pool's mean still sizes it in proportion.
    d = decide(kv_window(0.9, 0.95), Replicas(2, 4), spec, _settled_state(), now=0)
    assert d.desired_decode == 6 and "decode KV usage 90% (busiest 0.95" in d.reason


def test_missing_pool_gauges_hold_the_pool():
    """Outcomes but no worker gauges (their metrics not scraped): no evidence of room to spare."""
    spec = replace(SPEC, stabilization_seconds=0, cooldown_seconds=0, learn_capacity=False)
    w = MetricsWindow(
        duration_s=60, met=200, missed_ttft=5, missed_tpot=5, failed=0, ttft_p90_s=0.6, tpot_p90_s=0.04
    )
    d = decide(w, Replicas(4, 4), spec, PolicyState(), now=0)
    assert (d.desired_prefill, d.desired_decode) == (4, 4)
    assert d.no_data == ("prefill", "decode")
    assert "prefill backlog not reported: holding" in d.reason
    assert "decode KV usage not reported: holding" in d.reason
    # A known throughput and a measured rate size prefill without its backlog.
    rated = replace(w, prompt_tokens_per_s=1000.0, prompt_tokens_per_s_peak=1000.0)
    d = decide(rated, Replicas(4, 4), replace(spec, prefill_tokens_per_second=10_000), PolicyState(), now=0)
    assert (d.desired_prefill, d.desired_decode) == (2, 4) and d.no_data == ("decode",)


def test_a_memory_saved_by_a_clock_ahead_keeps_its_bursts():
    """Another operator replica saved the memory with its clock 2 min ahead of this one's: its
    times lie in the future, and the burst memory must not drop them as repeated calls."""
    spec = replace(SPEC, prefill_tokens_per_second=1000, max_step=4)
    state, cur = PolicyState(), Replicas(1, 2)
    for t in range(0, 781, 15):  # 500 tok/s, then a 2-minute burst at 4000 that ends at 780
        rate = 4000.0 if 660 <= t < 780 else 500.0
        d = decide(window(prompt_tokens_per_s=rate, prompt_tokens_per_s_peak=rate), cur, spec, state, now=t)
        cur = Replicas(d.desired_prefill, d.desired_decode)
    saved = json.loads(state.to_json())
    saved["rates"].reverse()  # in any order
    calm = window(prompt_tokens_per_s=500.0, prompt_tokens_per_s_peak=500.0)
    same = PolicyState.from_json(json.dumps(saved))
    assert list(same.rates) == list(state.rates)
    here = decide(calm, cur, spec, same, now=795)
    behind = decide(calm, cur, spec, PolicyState.from_json(json.dumps(saved)), now=795 - 120)
    assert here.inputs["prefill_sized_rate"] == behind.inputs["prefill_sized_rate"] == 4000
    assert (behind.desired_prefill, behind.desired_decode) == (here.desired_prefill, here.desired_decode)


def test_a_memory_saved_by_a_clock_behind_times_no_cold_start_across_the_gap():
    """A memory saved while prefill replicas were starting, by a clock an hour behind this one (or
    before an hour's pause: the two look alike). Timed across that gap, the cold start read an hour,
    and the burst memory then measured the rate's growth over an hour instead of a minute."""
    spec = replace(SPEC, prefill_tokens_per_second=1000, max_step=4)

    def rated(rate: float) -> MetricsWindow:
        return window(prompt_tokens_per_s=rate, prompt_tokens_per_s_peak=rate)

    writer, cur = PolicyState(), Replicas(1, 2)
    for t in range(0, 300, 15):  # calm, then a burst that adds prefill replicas
        d = decide(rated(500 if t < 285 else 3000), cur, spec, writer, now=t - 3600)
        cur = Replicas(d.desired_prefill, 2, prefill_ready=1, decode_ready=2)
    assert cur.prefill > 1 and "prefill" in writer.scaling_up
    ready = Replicas(cur.prefill, 2, prefill_ready=cur.prefill, decode_ready=2)
    restored = PolicyState.from_json(writer.to_json())
    d = decide(rated(3000), ready, spec, restored, now=300)  # they are ready 15 s later
    assert restored.startup_s is None  # not measured: 60 s, the default, until one is
    d = decide(rated(500), ready, spec, restored, now=315)
    assert "growth over a 60s startup" in d.reason, d.reason
    # The control: in one process, the same cold start is timed.
    decide(rated(3000), ready, spec, writer, now=300 - 3600)
    assert writer.startup_s == 15


def test_a_gap_since_the_memory_was_saved_counts_toward_no_stabilization_window():
    """A memory saved an hour ago by this clock, or just now by one an hour behind: the hour is
    unseen either way, and one calm window after it must not scale down where a fresh start
    watches a stabilization window first. A gap of a window or less hides nothing (each window
    saw the one before), and the memory carries on."""
    busy, calm = window(met=100, kv=0.5), window(met=100, kv=0.05)
    saved = PolicyState()
    for t in range(0, 600, 15):
        decide(busy, Replicas(4, 4), SPEC, saved, now=t - 3600)  # busy: holding 4/4
    for state in (PolicyState.from_json(saved.to_json()), PolicyState()):
        d = decide(calm, Replicas(4, 4), SPEC, state, now=600)
        assert (d.desired_prefill, d.desired_decode) == (4, 4), d.reason
        assert "stabilizing (0s of 300s seen)" in d.reason
        for t in range(615, 900, 15):
            d = decide(calm, Replicas(4, 4), SPEC, state, now=t)
        assert (d.desired_prefill, d.desired_decode) == (4, 4)
        d = decide(calm, Replicas(4, 4), SPEC, state, now=900)
        assert (d.desired_prefill, d.desired_decode) == (3, 3), d.reason
    # Saved a window ago: it has seen the busy minutes, and holds for them.
    restored = PolicyState.from_json(saved.to_json())
    d = decide(calm, Replicas(4, 4), SPEC, restored, now=585 - 3600 + 60)
    assert "stabilizing (recommended 4 within the last 300s)" in d.reason
