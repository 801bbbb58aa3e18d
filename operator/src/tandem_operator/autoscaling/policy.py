"""The autoscaling policy: one metrics window + the current sizes + the spec -> the desired sizes.

`decide` is a pure function of its arguments except for `state`, where it records its own recent
recommendations and the time of each change (for stabilization and cooldown); it reads no clock and
does no I/O, so the operator, `tandem up --autoscale` and the simulator all run the same code.

What it does, per pool (prefill and decode scale independently):

* **Phase attribution.** Requests that missed the TTFT SLO point at prefill, those that missed the
  TPOT SLO at decode. Requests a pool's workers turned away (RESOURCE_EXHAUSTED, by the router's
  `tandem_pool_rejected_requests_total{pool}`) count as that pool's misses: prefill's (each prefill
  worker tried at its request limit) are TTFT-side pressure, decode's (every decode KV cache full,
  or the decode workers at their limit) decode's; a rejection no pool is named for (a router older
  than that counter) is decode's. A phase is scaled
  up when its own miss fraction exceeds the allowed `1 - attainment`, or when the overall attainment
  is below target and that phase holds at least half of the misses. Requests the router turned away
  at its own in-flight limit (`router_rejected`) reached no pool: they point at no phase, and the
  fractions are of the requests the pools served. A router at its limit while the pools are slow
  shows in their own signals (misses, backlog, KV usage); one at its limit while they have room is
  the bottleneck itself, and more replicas would not be used. TTFT misses while the decode
  pool is KV-saturated (usage >= `kv_usage_high` and requests waiting) go to decode: the request
  waited for decode KV, not for prefill. Prefill's rejections stay prefill's: a decode worker
  reserves a request's KV before it asks prefill, so those had theirs.
* **Scale to fit, before anything finishes.** The prefill backlog (queued prompt tokens per
  replica) above `prefill_backlog_target_tokens`, or the decode KV usage above `kv_usage_high`, is
  an up signal even when the window holds no finished request (a queue that grows). Decode is
  sized on the pool's mean KV usage: the busiest replica's (one long context) is not relieved by
  more replicas, so it adds one, and only with requests waiting or decode missing its SLO.
* **Sizing.** Up signals are proportional (HPA-style `ceil(ready * observed / target)`), computed
  against the *ready* replicas so that replicas still starting are not counted twice, and SLO
  misses only scale a pool up once it has been fully ready for a whole window (a window that
  predates the current size does not judge it); before that they still hold it from scaling down
  (a replica that never becomes ready is no room to spare). When a prefill replica's throughput
  is known, declared (`prefill_tokens_per_second`) or learned (prompt tokens computed per
  engine-busy second, smoothed over windows), prefill is sized absolutely: the window's peak
  prompt-token arrival rate (as the burst memory below raises it) plus draining the backlog, at
  `target_utilization`; this sizes scale-down too.
* **Burst-aware prefill sizing.** A replica added now serves only after its cold start, and a
  burst of prompts can arrive faster than that. So the rate prefill is sized for is the highest of
  (a) this window's peak rate, (b) the `burst_quantile` (default: the `attainment` target) of the
  window peak rates seen over the last `burst_horizon_seconds`, time-weighted (the burst level
  the deployment has shown recently: a level exceeded for a tenth of the horizon at 0.9), and
  (c) this window's peak rate plus the same quantile of the growth of the peak rate over one cold
  start (`startup_seconds`; by default measured: how long the last prefill scale-up took to become
  ready, 60 s until one has), or over one window if that is longer: two window peaks less than a
  window apart share part of their window, and with it their bursts, so over a shorter lag the
  growth shows only for the few decisions at a burst's very start, under the quantile. (Simulated
  on the Azure code trace, measured over the cold start alone, replicas that start in 5 s attained
  85% where 60 s ones attained 93%; over at least a window, 94%.) The memory decays by expiry:
  once a burst is older than the horizon it no longer counts, and the sizes come back down
  through stabilization as below. An idle window does not erase it (capacity is kept for the
  bursts the horizon has shown); a window without a rate measurement neither adds to it nor uses
  it. `burst_horizon_seconds=0` sizes for this window alone.
* **Attainment feedback** (`attainment_feedback`, off by default) makes that headroom target the
  spec's attainment instead of over-shooting it: the quantile is set from the attainment realized
  over the same horizon, `q0 * (1 - (realized - target) / (1 - target))` clamped to [0, 1] (`q0`:
  the nominal quantile above): the nominal value when the horizon used exactly its miss budget, no
  headroom when it used none, more when it overspent. No outcome counts, or fewer than
  `min_requests` finished requests over the horizon: it stays as it was. It is off by default
  because on bursty traffic it oscillates: a horizon whose bursts were all caught drops the
  headroom, and the next burst is missed. Simulated on the Azure code trace started at minutes
  0, 20 and 40, it cut GPU-minutes by up to a tenth but attained 88.7%, 86.8% and 85.6% against
  a 90% target, where the nominal quantile attains 93.2%, 91.3% and 90.3%.
* **Scaling down** happens only when the phase is comfortably within its SLO (its misses at most
  `down_margin` x the allowed fraction, no prefill backlog to speak of; for decode also TPOT p90 at
  most `latency_headroom` x the SLO: per-token latency grows with the batch, while TTFT holds an
  irreducible prefill time, so it has no such check) or the deployment is idle, and only to the
  highest recommendation of the last `stabilization_seconds`
  (the recommendation must have stayed lower for the whole window). Without a known throughput
  the policy steps down one replica at a time. Decode KV held behind a prefill backlog (decode
  reserves KV before prefill) is not a decode signal. Requests never served count against the
  `down_margin` too, with the pool's own misses: failed ones for both pools (an error neither pool is
  blamed for, so failures scale nothing up, but a window where every request failed put no load
  on either pool and must not read as room to spare), those the router turned away at its own
  limit (demand neither pool saw) and those the other pool turned away (its misses already; this
  pool never served them, and its load then looks lighter than it is).
* **No decision** on missing metrics or on fewer than `min_requests` finished requests in the
  window (SLO statistics from a handful of requests are noise); the reason says so. A pool whose
  own gauges are missing (decode KV usage; prefill backlog, unless a known throughput sizes
  prefill) is held too: an unscraped worker is no evidence of an empty one. Backlog/KV
  pressure still scales up, and an idle deployment (no requests, nothing queued, nothing running)
  counts as data: it recommends the minimum (for prefill: what the burst memory still sizes, if
  more).
* **Guards**, in order: cooldown after a pool's last change, `max_step`, min/max bounds, then the
  optional prefill:decode ratio band (repaired by raising the lagging pool first; the band is an
  invariant the user declared, so its repair is not limited by step or cooldown).

Field names follow the operator's CRD (`api.SLO`, `api.Autoscaling`, `api.Pool`): ttftMs, tpotMs,
attainment, windowSeconds, stabilizationSeconds, cooldownSeconds, maxStep, prefillDecodeRatio,
minReplicas/maxReplicas. The remaining tuning fields are not in the CRD (yet) and have defaults.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

POOLS = ("prefill", "decode")


@dataclass(frozen=True)
class AutoscalingSpec:
    # api.SLO
    ttft_ms: float = 1000.0
    tpot_ms: float = 100.0
    attainment: float = 0.9
    # api.Pool (prefill / decode): minReplicas, maxReplicas
    prefill_min_replicas: int = 1
    prefill_max_replicas: int = 1
    decode_min_replicas: int = 1
    decode_max_replicas: int = 1
    # api.Autoscaling
    window_seconds: float = 60.0
    stabilization_seconds: float = 300.0
    cooldown_seconds: float = 60.0
    max_step: int = 1
    ratio_min: float | None = None  # api.Autoscaling.prefillDecodeRatio.min
    ratio_max: float | None = None  # api.Autoscaling.prefillDecodeRatio.max
    # Tuning not in the CRD.
    max_step_down: int | None = None  # most replicas removed at once (default: max_step)
    min_requests: int = 20  # fewer finished requests in a window: no SLO-based decision
    prefill_backlog_target_tokens: float | None = None  # per replica; None: derived (see below)
    prefill_tokens_per_second: float | None = None  # declared prefill throughput of one replica
    target_utilization: float = 0.7  # of that throughput, at the window's peak arrival rate
    kv_usage_high: float = 0.85  # decode KV usage above which decode is added
    kv_usage_target: float = 0.6  # decode KV usage sizing aims at
    down_margin: float = 0.5  # scale down only while a phase misses <= this x the allowed fraction
    learn_capacity: bool = True  # without prefill_tokens_per_second: learn it (prefill_tokens_per_busy_s)
    capacity_smoothing: float = 0.3
    latency_headroom: float = 0.5  # ... and decode only while TPOT p90 <= this x the SLO
    # Burst-aware prefill sizing (see the module docstring); needs a prefill throughput and a rate.
    burst_horizon_seconds: float = 600.0  # window peak rates remembered this long (0: this window only)
    burst_quantile: float | None = None  # quantile of them and of their growth (None: attainment)
    startup_seconds: float | None = None  # a new prefill replica's cold start (None: measured, else 60 s)
    attainment_feedback: bool = False  # adapt that quantile to the attainment realized over the horizon

    def __post_init__(self) -> None:
        for pool in POOLS:
            lo, hi = self.bounds(pool)
            if lo < 0 or hi < lo:
                raise ValueError(f"{pool}: need 0 <= min_replicas <= max_replicas, got {lo}, {hi}")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"attainment must be in (0, 1], got {self.attainment}")
        if self.max_step < 1:
            raise ValueError(f"max_step must be >= 1, got {self.max_step}")
        if (self.ratio_min is None) != (self.ratio_max is None):
            raise ValueError("set both ratio_min and ratio_max, or neither")
        if self.ratio_min is not None and not 0 < self.ratio_min <= self.ratio_max:  # type: ignore[operator]
            raise ValueError(f"need 0 < ratio_min <= ratio_max, got {self.ratio_min}, {self.ratio_max}")
        if self.burst_horizon_seconds < 0:
            raise ValueError(f"burst_horizon_seconds must be >= 0, got {self.burst_horizon_seconds}")
        if self.burst_quantile is not None and not 0 < self.burst_quantile <= 1:
            raise ValueError(f"burst_quantile must be in (0, 1], got {self.burst_quantile}")
        if self.startup_seconds is not None and self.startup_seconds < 0:
            raise ValueError(f"startup_seconds must be >= 0, got {self.startup_seconds}")

    def bounds(self, pool: str) -> tuple[int, int]:
        if pool == "prefill":
            return self.prefill_min_replicas, self.prefill_max_replicas
        return self.decode_min_replicas, self.decode_max_replicas

    @property
    def rate_quantile(self) -> float:
        """The quantile of remembered peak rates (and of their growth) prefill is sized for."""
        return self.attainment if self.burst_quantile is None else self.burst_quantile

    @property
    def backlog_target_tokens(self) -> float:
        """Queued prompt tokens per prefill replica above which prefill is added.

        Default: half a TTFT budget of work at the declared throughput, else 8192 tokens."""
        if self.prefill_backlog_target_tokens is not None:
            return self.prefill_backlog_target_tokens
        if self.prefill_tokens_per_second:
            return max(1.0, 0.5 * self.prefill_tokens_per_second * self.ttft_ms / 1000.0)
        return 8192.0

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **tuning: Any) -> AutoscalingSpec:
        """From a ModelDeployment `spec` as on the wire (camelCase; snake_case is accepted too).

        Pool bounds default to the pool's `replicas` (as the CRD documents); `tuning` sets the
        fields that are not in the CRD."""

        def get(d: dict[str, Any] | None, camel: str, default: Any = None) -> Any:
            if not d:
                return default
            snake = "".join("_" + c.lower() if c.isupper() else c for c in camel)
            v = d.get(camel, d.get(snake))
            return default if v is None else v

        slo = get(spec, "slo", {}) or {}
        auto = get(spec, "autoscaling", {}) or {}
        kw: dict[str, Any] = {
            "ttft_ms": float(get(slo, "ttftMs", cls.ttft_ms)),
            "tpot_ms": float(get(slo, "tpotMs", cls.tpot_ms)),
            "attainment": float(get(slo, "attainment", cls.attainment)),
            "window_seconds": float(get(auto, "windowSeconds", cls.window_seconds)),
            "stabilization_seconds": float(get(auto, "stabilizationSeconds", cls.stabilization_seconds)),
            "cooldown_seconds": float(get(auto, "cooldownSeconds", cls.cooldown_seconds)),
            "max_step": int(get(auto, "maxStep", cls.max_step)),
        }
        band = get(auto, "prefillDecodeRatio")
        if band:
            kw["ratio_min"], kw["ratio_max"] = float(band["min"]), float(band["max"])
        for pool in POOLS:
            p = get(spec, pool)
            if p is None:
                continue
            replicas = int(get(p, "replicas", 1))
            kw[f"{pool}_min_replicas"] = int(get(p, "minReplicas", replicas))
            kw[f"{pool}_max_replicas"] = int(get(p, "maxReplicas", replicas))
        kw.update(tuning)
        return cls(**kw)


@dataclass
class MetricsWindow:
    """What was measured over the last `duration_s` seconds; None means "not available".

    Request counts are of requests that finished in the window, by the router's outcome label
    (one outcome per request: missed_ttft wins over missed_tpot). Pool gauges are averages over
    the pool's replicas and the window; `*_max` is the busiest replica's highest scrape in the
    window (the max over replicas and scrapes, as Prometheus' `max(max_over_time(...))` reads it):
    the time max follows a rising gauge to its latest value, where the mean lags by half a window,
    and the replica max is the first to reach a limit."""

    duration_s: float
    met: int | None = None
    missed_ttft: int | None = None
    missed_tpot: int | None = None
    failed: int | None = None  # an error no pool is blamed for: blocks scale-down, never scales up
    rejected: int = 0  # turned away (RESOURCE_EXHAUSTED: every decode KV cache full, a pool's workers
    # at their request limit, or the router at its own in-flight limit)
    router_rejected: int = 0  # of `rejected`, those the router turned away at its own in-flight limit
    prefill_rejected: int = 0  # of `rejected`, those the prefill workers turned away
    # ... and those the decode workers turned away; None: the router does not say which pool turned
    # a request away (older than that counter), and the rest of `rejected` is decode's
    decode_rejected: int | None = None
    ttft_p50_s: float | None = None
    ttft_p90_s: float | None = None
    ttft_p99_s: float | None = None
    tpot_p50_s: float | None = None
    tpot_p90_s: float | None = None
    tpot_p99_s: float | None = None
    prefill_backlog_tokens: float | None = None  # queued prompt tokens per prefill replica
    prefill_backlog_tokens_max: float | None = None
    prompt_tokens_per_s: float | None = None  # arrival rate over the window
    prompt_tokens_per_s_peak: float | None = None  # highest rate over short sub-windows
    prefill_tokens_per_busy_s: float | None = None  # prompt tokens computed per engine-busy second
    prefill_running: float | None = None
    prefill_waiting: float | None = None
    decode_kv_usage: float | None = None  # used fraction of the KV pool, 0..1
    decode_kv_usage_max: float | None = None
    decode_running: float | None = None
    decode_waiting: float | None = None

    @property
    def finished(self) -> int | None:
        parts = (self.met, self.missed_ttft, self.missed_tpot, self.failed)
        if any(p is None for p in parts):
            return None
        return sum(parts) + self.rejected  # type: ignore[arg-type]

    @property
    def attainment(self) -> float | None:
        n = self.finished
        return None if not n else (self.met or 0) / n

    @property
    def router_limited(self) -> int:
        """Requests the router turned away at its own in-flight limit (at most `rejected`: two
        counters read at once may round apart)."""
        return max(0, min(self.router_rejected, self.rejected))

    @property
    def pool_rejected(self) -> int:
        """Rejected requests a pool turned away (every decode KV cache full, the workers busy)."""
        return self.rejected - self.router_limited

    @property
    def rejected_by_prefill(self) -> int:
        """Of `pool_rejected`, those the prefill workers turned away (clamped as `router_limited`)."""
        return max(0, min(self.prefill_rejected, self.pool_rejected))

    @property
    def rejected_by_decode(self) -> int:
        """Of `pool_rejected`, the decode workers' (KV full, at their request limit), or all the rest
        from a router that does not say which pool turned a request away. Counted apart, what no
        count takes is no pool's: Prometheus' increase() extrapolates each series on its own, and
        a remainder would hand decode the others' rounding (a few, whenever prefill rejects many)."""
        rest = self.pool_rejected - self.rejected_by_prefill
        return rest if self.decode_rejected is None else max(0, min(self.decode_rejected, rest))

    @property
    def served(self) -> int | None:
        """Finished requests that reached the pools: all but those the router turned away itself."""
        n = self.finished
        return None if n is None else n - self.router_limited

    def has_pool_data(self) -> bool:
        return self.prefill_backlog_tokens is not None or self.decode_kv_usage is not None

    def is_idle(self) -> bool:
        """Evidence that nothing is happening (not an absence of evidence)."""
        return (
            self.finished == 0
            and (self.prefill_backlog_tokens_max or self.prefill_backlog_tokens or 0) == 0
            and not self.prefill_running
            and not self.prefill_waiting
            and not self.decode_running
            and not self.decode_waiting
            and self.prefill_backlog_tokens is not None
            and self.decode_running is not None
        )


@dataclass(frozen=True)
class Replicas:
    """Current sizes (what the pools are set to) and, optionally, how many of them are ready."""

    prefill: int
    decode: int
    prefill_ready: int | None = None
    decode_ready: int | None = None

    def get(self, pool: str) -> int:
        return self.prefill if pool == "prefill" else self.decode

    def ready(self, pool: str) -> int:
        r = self.prefill_ready if pool == "prefill" else self.decode_ready
        return self.get(pool) if r is None else min(r, self.get(pool))


@dataclass
class PolicyState:
    """What `decide` remembers between calls: recent recommendations and the last change per pool."""

    history: dict[str, deque[tuple[float, int]]] = field(default_factory=lambda: {p: deque() for p in POOLS})
    last_change: dict[str, float] = field(default_factory=dict)
    settled: dict[str, float] = field(default_factory=dict)  # when each pool last became all ready
    prefill_capacity: float | None = None  # learned tokens/s of one busy prefill replica
    rates: deque[tuple[float, float]] = field(default_factory=deque)  # (now, the window's peak prompt rate)
    startup_s: float | None = None  # measured: how long the last prefill scale-up took to be ready
    scaling_up: dict[str, tuple[float, int]] = field(default_factory=dict)  # (when, to): not all ready yet
    started: float | None = None
    # (now, requests that met their TTFT, requests finished) per window
    outcomes: deque[tuple[float, int, int]] = field(default_factory=deque)
    burst_q: float | None = None  # the burst quantile as attainment feedback set it (None: nominal)
    # Read by from_json and not used since: its times may be another process's clock (see rebase).
    restored: bool = field(default=False, compare=False)

    # The JSON form's version: a state written by another layout is not read (the caller starts afresh).
    JSON_VERSION = 1

    def to_json(self) -> str:
        """This state as compact JSON, to outlive the process (the operator keeps it in status).

        Its times are those `decide` was given, so they mean something to another process only if
        the caller's clock does (wall time, not a monotonic clock)."""
        return json.dumps(
            {
                "v": self.JSON_VERSION,
                "history": {p: [list(x) for x in h] for p, h in self.history.items()},
                "lastChange": self.last_change,
                # inf (replicas still starting) as None: JSON has no infinity
                "settled": {p: (None if math.isinf(t) else t) for p, t in self.settled.items()},
                "prefillCapacity": self.prefill_capacity,
                "rates": [list(x) for x in self.rates],
                "startup": self.startup_s,
                "scalingUp": {p: list(x) for p, x in self.scaling_up.items()},
                "started": self.started,
                "outcomes": [list(x) for x in self.outcomes],
                "burstQ": self.burst_q,
            },
            separators=(",", ":"),
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str) -> PolicyState:
        """The state `to_json` wrote; ValueError for anything else (another version, a bad shape)."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("v") != cls.JSON_VERSION:
                raise ValueError(f"not a version-{cls.JSON_VERSION} policy state")
            opt = lambda v: None if v is None else float(v)  # noqa: E731
            # Sorted: `decide` trims them from the oldest end and replaces at the newest.
            return cls(
                history={p: deque(sorted((float(t), int(n)) for t, n in h)) for p, h in d["history"].items()},
                last_change={p: float(t) for p, t in d["lastChange"].items()},
                settled={p: (math.inf if t is None else float(t)) for p, t in d["settled"].items()},
                prefill_capacity=opt(d["prefillCapacity"]),
                rates=deque(sorted((float(t), float(r)) for t, r in d["rates"])),
                startup_s=opt(d["startup"]),
                scaling_up={p: (float(t), int(n)) for p, (t, n) in d["scalingUp"].items()},
                started=opt(d["started"]),
                outcomes=deque(sorted((float(t), int(m), int(n)) for t, m, n in d["outcomes"])),
                burst_q=opt(d["burstQ"]),
                restored=True,
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a policy state: {e!r}") from None

    def rebase(self, now: float) -> float:
        """Move every time in this state back by as much as its newest lies after `now`; return how
        long before `now` its newest time then lies (the gap since it was saved, as far as known).

        A state written by a process whose clock ran ahead of this one's (another operator
        replica; this one before a restart and a clock step back) holds times in the future: the
        cooldown and readiness would last longer by the skew, and the burst memory would drop them
        all as repeated calls. One shift for all keeps their spacing, which is what they mean:
        clamping each to `now` would pile them on one instant, where the time-weighted quantiles
        give them no weight.

        A clock that ran behind leaves no such mark: its times only look older, as after a pause of
        as long, and nothing in the state tells the two apart (the state's times are all the
        writer's; telling them apart needs a clock both share, such as the API server's). So it is
        read as a pause: the cooldown and the burst memory expire that much sooner, at worst as if
        the state were fresh (a restart without memory), and what a gap must not read as observed,
        `decide` does not (see there)."""
        finite = [t for t in self.settled.values() if not math.isinf(t)]
        newest = max(
            [h[-1][0] for h in self.history.values() if h]
            + list(self.last_change.values())
            + finite
            + [t for t, _ in self.scaling_up.values()]
            + [x[-1][0] for x in (self.rates, self.outcomes) if x]
            + ([] if self.started is None else [self.started]),
            default=now,
        )
        skew = newest - now
        if skew <= 0:
            return -skew
        self.history = {p: deque((t - skew, n) for t, n in h) for p, h in self.history.items()}
        self.last_change = {p: t - skew for p, t in self.last_change.items()}
        self.settled = {p: t if math.isinf(t) else t - skew for p, t in self.settled.items()}
        self.scaling_up = {p: (t - skew, n) for p, (t, n) in self.scaling_up.items()}
        self.rates = deque((t - skew, r) for t, r in self.rates)
        self.outcomes = deque((t - skew, m, n) for t, m, n in self.outcomes)
        if self.started is not None:
            self.started -= skew
        return 0.0


@dataclass
class Decision:
    desired_prefill: int
    desired_decode: int
    reason: str
    inputs: dict[str, Any]
    no_data: tuple[str, ...] = ()  # pools held for missing or too little data (status: say so)

    def desired(self, pool: str) -> int:
        return self.desired_prefill if pool == "prefill" else self.desired_decode


def holding_reason(decision: Decision, window: MetricsWindow, source: str = "Prometheus") -> str | None:
    """Why pools hold for want of data (None: none does), in stable text that changes only with the
    situation (the operator's `status.autoscaler.holding`, `tandem up --autoscale`'s output)."""
    if not decision.no_data:
        return None
    pools = ", ".join(decision.no_data)
    if window.finished is None and not window.has_pool_data():
        return f"no metrics for this deployment in {source}: holding {pools}"
    return f"too few finished requests in the window to judge the SLOs: holding {pools}"


@dataclass
class _Rec:
    value: int
    why: str
    hold: bool = False  # no evidence either way (missing or too little data)


def _ceil(x: float) -> int:
    return int(math.ceil(x - 1e-9))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _unserved_hold(pool: str, w: MetricsWindow, own: float, margin: float, n_cur: int) -> _Rec | None:
    """Hold `pool` when its own miss fraction `own` plus the requests it never served (failed; turned
    away at the router's own limit or by the other pool's workers) exceed `margin`: requests that
    errored out or were turned away put no load on the pool, so a window of them would otherwise
    read as room to spare."""
    finished = w.finished or 0
    other = "decode" if pool == "prefill" else "prefill"
    counts = [
        (w.failed or 0, "failed"),
        (w.rejected_by_decode if pool == "prefill" else w.rejected_by_prefill, f"rejected by {other}"),
        (w.router_limited, "turned away at the router's in-flight limit"),
    ]
    lost = sum(n for n, _ in counts)
    if not lost or own + lost / finished <= margin:
        return None
    (n, verb), *rest = [c for c in counts if c[0]]
    more = "".join(f", {m} {v}" for m, v in rest)
    return _Rec(n_cur, f"{n} of {finished} requests {verb}{more}: holding")


def _recommend(
    pool: str,
    w: MetricsWindow,
    cur: Replicas,
    spec: AutoscalingSpec,
    settled: bool,
    learned_cap: float | None,
    burst: tuple[float, str] | None = None,
) -> _Rec:
    """The size this pool needs according to this window (before stabilization and guards).

    `burst`: (the prompt rate prefill is sized for, why) from the burst memory, if any."""
    n_cur, n_ready = cur.get(pool), max(cur.ready(pool), 0)
    lo, _ = spec.bounds(pool)
    allowed = 1.0 - spec.attainment
    # The pools are judged on the requests they served: those the router turned away at its own
    # limit never reached them.
    finished = w.served
    slo_ok = finished is not None and finished >= spec.min_requests
    ups: list[tuple[int, str]] = []
    base = max(n_ready, 1)

    # Decode reserves a request's KV before its prefill starts: behind a prefill backlog, the KV is
    # held by requests waiting for prefill, and more decode would only lengthen that queue.
    prefill_bound = (w.prefill_backlog_tokens or 0.0) > spec.backlog_target_tokens
    decode_saturated = (
        not prefill_bound
        and (w.decode_kv_usage_max or w.decode_kv_usage or 0) >= spec.kv_usage_high
        and (w.decode_waiting or 0) > 0
    )
    # Each pool's share of the misses, by kind (fractions of `finished`).
    kinds: dict[str, float] = {}
    if slo_ok:
        n = finished or 1
        kinds = {
            "TTFT misses": (w.missed_ttft or 0) / n,
            "prefill rejections": w.rejected_by_prefill / n,
            "TPOT misses": (w.missed_tpot or 0) / n,
            "decode rejections": w.rejected_by_decode / n,
        }
    m_ttft = kinds.get("TTFT misses", 0.0)
    m_prej = kinds.get("prefill rejections", 0.0)  # prefill's even while decode is saturated
    m_tpot = kinds.get("TPOT misses", 0.0) + kinds.get("decode rejections", 0.0)
    # The pools' misses together, not 1 - attainment: failures are no pool's (they scale nothing
    # up), and with them in, a pool's few misses beside many failures grew that pool.
    m_total = m_ttft + m_prej + m_tpot
    # Unsettled, the window predates the current size: its misses do not size it up, but they still
    # forbid a scale-down (a replica that never becomes ready must not read as room to spare).
    unsettled = ""
    if not settled:
        ready = f"{n_ready} of {n_cur} ready" if n_ready < n_cur else "all ready for less than a window"
        unsettled = f" ({ready}: misses scale nothing up)"
    slo_missed = False  # this pool's own misses call for more of it
    if slo_ok and settled:
        ttft_pool = "decode" if decode_saturated else "prefill"
        owners = {"TTFT misses": ttft_pool, "prefill rejections": "prefill"}
        mine = [k for k, v in kinds.items() if v > 0 and owners.get(k, "decode") == pool]
        m = sum(kinds[k] for k in mine)
        slo_missed = m > 0 and (m > allowed or (m_total > allowed and m >= m_total / 2))
        if slo_missed:
            why = f"{' and '.join(mine)} {m:.0%} of {finished} requests"
            if m <= allowed:  # within the allowance alone: the larger share of misses over it together
                why += f", the larger share of all misses {m_total:.0%}"
            ups.append(
                (
                    max(n_ready + 1, _ceil(base * (1.0 + m - min(m, allowed)))),
                    f"{why} > allowed {allowed:.0%}",
                )
            )

    if pool == "prefill":
        target = spec.backlog_target_tokens
        backlog = w.prefill_backlog_tokens  # the mean: a queue that persists, not a burst's crest
        backlog_max = w.prefill_backlog_tokens_max if w.prefill_backlog_tokens_max is not None else backlog
        cap = spec.prefill_tokens_per_second or learned_cap
        rate = _window_rate(w)
        fit = None
        sized, note = (rate, "") if burst is None or rate is None else burst
        if cap and sized is not None:
            # Serve the peak arrival rate (as the burst memory sizes it) and drain the mean backlog
            # within one window.
            drain = (backlog or 0.0) * n_ready / max(w.duration_s, 1.0)
            fit = _ceil((sized + drain) / (cap * spec.target_utilization))
            if fit > n_cur:
                ups.append(
                    (
                        fit,
                        f"peak prompt rate {rate:.0f} tok/s{note} (+{drain:.0f} backlog) needs {fit}"
                        f" x {cap:.0f} tok/s{'' if spec.prefill_tokens_per_second else ' (learned)'}"
                        f" at {spec.target_utilization:.0%}",
                    )
                )
        elif backlog is not None and backlog > target:
            ups.append(
                (
                    max(n_ready + 1, _ceil(base * backlog / target)),
                    f"prefill backlog {backlog:.0f} tokens/replica > {target:.0f}",
                )
            )
        if ups:
            return _Rec(max(u[0] for u in ups), "; ".join(u[1] for u in ups))
        if w.is_idle():
            if fit is not None and fit > lo:  # the burst memory still sizes for recent bursts
                return _Rec(fit, f"idle, but peak prompt rate {rate:.0f} tok/s{note} fits {fit}")
            return _Rec(lo, "idle: no requests, nothing queued or running")
        if finished is None and backlog is None:
            return _Rec(n_cur, "no data: holding", hold=True)
        if not slo_ok:
            return _Rec(
                n_cur,
                f"too few requests ({finished} < {spec.min_requests}) in the window: holding",
                hold=True,
            )
        p90 = w.ttft_p90_s
        own = m_ttft + m_prej
        if own > spec.down_margin * allowed:
            what = " and ".join(k for k in ("TTFT misses", "prefill rejections") if kinds.get(k))
            return _Rec(
                n_cur,
                f"{what} {own:.0%} not below {spec.down_margin:.0%} of allowed{unsettled}: holding",
            )
        held = _unserved_hold(pool, w, own, spec.down_margin * allowed, n_cur)
        if held is not None:
            return held
        if fit is not None:
            return _Rec(max(fit, lo), f"TTFT within SLO; peak prompt rate {rate:.0f} tok/s{note} fits {fit}")
        if backlog is None:  # workers not scraped, and no throughput to size by: no evidence of room
            return _Rec(n_cur, "prefill backlog not reported: holding", hold=True)
        if backlog_max is not None and backlog_max > 0.25 * target:
            return _Rec(n_cur, f"prefill backlog up to {backlog_max:.0f} tokens/replica: holding")
        return _Rec(max(n_cur - 1, lo), f"TTFT within SLO (p90 {_fmt(p90)}s): one fewer")

    # decode
    usage = w.decode_kv_usage  # the pool's mean, what added replicas would share: it sizes the pool
    # The busiest replica's: a long context fills one replica's KV and stays there however many are
    # added, so it never sizes the pool; with requests waiting or decode missing its SLO, it adds one
    # above what the mean sizes (not one per decision: a lasting queue would ratchet to the maximum).
    usage_hi = w.decode_kv_usage_max if w.decode_kv_usage_max is not None else usage
    waiting = w.decode_waiting or 0
    if prefill_bound and usage_hi is not None and usage_hi >= spec.kv_usage_target:
        ups_note = f"; KV usage {usage_hi:.0%} held behind a prefill backlog: left to prefill"
    else:
        ups_note = ""
    if (
        usage is not None
        and not prefill_bound
        and (usage >= spec.kv_usage_high or (waiting > 0 and usage >= spec.kv_usage_target))
    ):
        ups.append(
            (
                max(n_ready + 1, _ceil(base * usage / spec.kv_usage_target)),
                f"decode KV usage {usage:.0%} (busiest {_fmt(usage_hi)}, waiting {_fmt(w.decode_waiting)})",
            )
        )
    elif (
        usage_hi is not None
        and not prefill_bound
        and usage_hi >= spec.kv_usage_high
        and (waiting > 0 or slo_missed)
        and (usage is None or _ceil(n_ready * usage / spec.kv_usage_target) >= n_ready)
    ):
        ups.append(
            (
                n_ready + 1,
                f"busiest decode KV usage {usage_hi:.0%} (mean {_fmt(usage)}) with "
                + (f"{waiting:.3g} waiting" if waiting > 0 else "TPOT missed")
                + ": one more",
            )
        )
    if ups:
        return _Rec(max(u[0] for u in ups), "; ".join(u[1] for u in ups) + ups_note)
    if w.is_idle():
        return _Rec(lo, "idle: no requests, nothing queued or running")
    if ups_note:
        return _Rec(n_cur, ups_note[2:] + ": holding")
    if finished is None and usage is None:
        return _Rec(n_cur, "no data: holding", hold=True)
    if not slo_ok:
        return _Rec(
            n_cur, f"too few requests ({finished} < {spec.min_requests}) in the window: holding", hold=True
        )
    p90 = w.tpot_p90_s
    if m_tpot > spec.down_margin * allowed:
        what = " and ".join(k for k in ("TPOT misses", "decode rejections") if kinds.get(k))
        return _Rec(
            n_cur, f"{what} {m_tpot:.0%} not below {spec.down_margin:.0%} of allowed{unsettled}: holding"
        )
    held = _unserved_hold(pool, w, m_tpot, spec.down_margin * allowed, n_cur)
    if held is not None:
        return held
    if usage is None:  # workers not scraped: not evidence of an empty cache
        return _Rec(n_cur, "decode KV usage not reported: holding", hold=True)
    if p90 is not None and p90 > spec.latency_headroom * spec.tpot_ms / 1000.0:
        return _Rec(n_cur, f"TPOT p90 {p90:.3g}s above {spec.latency_headroom:.0%} of the SLO: holding")
    if usage_hi is not None and usage_hi >= spec.kv_usage_high and waiting > 0:  # what added one
        return _Rec(n_cur, f"busiest decode KV usage {usage_hi:.0%} with {waiting:.3g} waiting: holding")
    kv_fit = _ceil(n_cur * usage / spec.kv_usage_target)
    if kv_fit >= n_cur:
        return _Rec(n_cur, f"decode KV usage {_fmt(usage)}: holding")
    return _Rec(
        max(n_cur - 1, kv_fit, lo), f"TPOT within SLO (p90 {_fmt(p90)}s), KV usage {_fmt(usage)}: one fewer"
    )


def _learn_capacity(w: MetricsWindow, spec: AutoscalingSpec, state: PolicyState) -> None:
    """Learn one prefill replica's throughput: prompt tokens computed per second of engine-busy time.

    Averaged over windows (exponentially, weight `capacity_smoothing` on the newest); a window with
    fewer than `min_requests` finished requests does not count (a few small batches understate it)."""
    v = w.prefill_tokens_per_busy_s
    if v is None or v <= 0 or (w.finished or 0) < spec.min_requests:
        return
    old = state.prefill_capacity
    state.prefill_capacity = v if old is None else old + spec.capacity_smoothing * (v - old)


def _window_rate(w: MetricsWindow) -> float | None:
    """The window's peak prompt-token arrival rate (its mean if no peak was measured)."""
    return w.prompt_tokens_per_s_peak if w.prompt_tokens_per_s_peak is not None else w.prompt_tokens_per_s


def _startup(spec: AutoscalingSpec, state: PolicyState) -> float:
    if spec.startup_seconds is not None:
        return spec.startup_seconds
    return state.startup_s if state.startup_s is not None else 60.0


def _weighted_quantile(samples: list[tuple[float, float]], q: float) -> float:
    """The smallest value at or below which at least a fraction q of the total weight lies."""
    ordered = sorted(samples)
    total = sum(wt for _, wt in ordered)
    acc = 0.0
    for v, wt in ordered:
        acc += wt
        if acc >= q * total * (1 - 1e-9):
            return v
    return ordered[-1][0]


def _burst_rate(rate: float, spec: AutoscalingSpec, state: PolicyState, now: float) -> tuple[float, str]:
    """Record this window's peak prompt rate; return the rate prefill is sized for, and why.

    The highest of: `rate`; the `rate_quantile` of the peaks remembered over the last
    `burst_horizon_seconds`; `rate` plus that quantile of the peak's growth over one cold start
    (at least a window: see the module docstring). Quantiles are time-weighted: each sample stands
    for the time since the one before (at most a window), so how often `decide` runs does not
    change them."""
    horizon = spec.burst_horizon_seconds
    startup = _startup(spec, state)
    lag = max(startup, spec.window_seconds)
    while state.rates and state.rates[-1][0] == now:  # a repeated call at the same time replaces
        state.rates.pop()
    state.rates.append((now, rate))
    while state.rates and state.rates[0][0] < now - horizon - lag:  # growth looks back a lag
        state.rates.popleft()
    if horizon <= 0:
        return rate, ""
    pts = list(state.rates)
    levels: list[tuple[float, float]] = []
    growths: list[tuple[float, float]] = []
    j = -1  # the last sample at or before t - lag
    for i, (t, r) in enumerate(pts):
        while j + 1 < i and pts[j + 1][0] <= t - lag:
            j += 1
        if t < now - horizon:
            continue
        prev = pts[i - 1][0] if i > 0 else t - spec.window_seconds
        wt = max(min(t - prev, spec.window_seconds), 1e-6)
        levels.append((r, wt))
        if j >= 0:
            growths.append((max(0.0, r - pts[j][1]), wt))
    q = spec.rate_quantile if state.burst_q is None else state.burst_q
    level = _weighted_quantile(levels, q)
    growth = _weighted_quantile(growths, q) if growths else 0.0
    sized = max(rate, level, rate + growth)
    if sized <= rate:
        return rate, ""
    over = f"a {startup:.0f}s startup" if startup >= lag else f"a {lag:.0f}s window (startup {startup:.0f}s)"
    return sized, (
        f" (burst memory: {q:.0%} of {horizon:.0f}s of peaks {level:.0f}, growth over"
        f" {over} +{growth:.0f}: sized for {sized:.0f})"
    )


def _attainment_feedback(w: MetricsWindow, spec: AutoscalingSpec, state: PolicyState, now: float) -> str:
    """Set the burst quantile from the TTFT attainment realized over the last `burst_horizon_seconds`.

    Requests that met their TTFT count as met here even if they missed TPOT, and so do those the
    decode workers turned away: those misses are the decode pool's, which prefill headroom cannot
    fix. Those the prefill workers turned away count as missed.

    The quantile is a headroom bought to meet the target; the outcomes of the horizon say how much
    of it was needed. With `a` the realized attainment, `t` the target and `q0` the nominal
    quantile (`rate_quantile`), it is the line through two points fixed by the spec:

        q = q0 * (1 - (a - t) / (1 - t)),  clamped to [0, 1]

    a horizon that used exactly the miss budget (a = t) keeps q0; one that used none of it (a = 1)
    needs no burst headroom (q = 0: the memory's lowest remembered peak and growth, so in effect
    this window's peak alone); below target it rises, up to the highest remembered peak. It is
    proportional, not integrating: the horizon's outcomes already average over time, and an
    integral of an average that lags by a horizon winds up. Each window's counts are time-weighted
    like the rates (a window overlapping the previous one counts for its new part), so how often
    `decide` runs does not change the realized attainment. No data (no outcome counts in this
    window, or fewer than `min_requests` finished requests over the horizon): the quantile stays
    as it was. Returns a note for the reason ("" when unchanged)."""
    horizon, allowed = spec.burst_horizon_seconds, 1.0 - spec.attainment
    if not spec.attainment_feedback or horizon <= 0 or allowed <= 0:
        return ""
    finished = w.served  # those the router turned away at its own limit, prefill could not serve
    if finished is not None:
        while state.outcomes and state.outcomes[-1][0] == now:  # a repeated call at the same time replaces
            state.outcomes.pop()
        # Only what prefill sizing can fix counts against it: a request that met its TTFT but
        # missed TPOT, or that the decode workers turned away, is decode's miss (failures count
        # against both).
        state.outcomes.append((now, (w.met or 0) + (w.missed_tpot or 0) + w.rejected_by_decode, finished))
    while state.outcomes and state.outcomes[0][0] < now - horizon:
        state.outcomes.popleft()
    if finished is None:
        return ""
    # Each window's counts are weighted by the part of it that is new (not covered by the window
    # before) and inside the horizon: the oldest window sticks out of the horizon by up to a
    # window, and counting it whole let a burst of misses outlive the horizon.
    met = n = 0.0
    covered = now - horizon
    for t, m, f in state.outcomes:
        wt = max(0.0, t - max(covered, t - spec.window_seconds)) / spec.window_seconds
        met, n, covered = met + wt * m, n + wt * f, max(covered, t)
    if n < spec.min_requests:
        return ""
    realized = met / n
    q0 = spec.rate_quantile
    state.burst_q = min(1.0, max(0.0, q0 * (1.0 - (realized - spec.attainment) / allowed)))
    return f"{realized:.1%} attained over {horizon:.0f}s: quantile {state.burst_q:.0%}"


def _ratio_repair(p: int, d: int, spec: AutoscalingSpec) -> tuple[int, int, str]:
    """Bring P/D into [ratio_min, ratio_max]: raise the lagging pool, else lower the other."""
    if spec.ratio_min is None or spec.ratio_max is None:
        return p, d, ""
    (p_lo, p_hi), (d_lo, d_hi) = spec.bounds("prefill"), spec.bounds("decode")
    eps = 1e-9
    if d == 0:
        return p, d, ""
    if p / d > spec.ratio_max + eps:
        need = _ceil(p / spec.ratio_max)
        if need <= d_hi:
            return p, need, f"ratio band: decode raised to {need}"
        d = d_hi
        return max(p_lo, int(math.floor(d * spec.ratio_max + eps))), d, "ratio band: prefill lowered"
    if p / d < spec.ratio_min - eps:
        need = _ceil(d * spec.ratio_min)
        if need <= p_hi:
            return need, d, f"ratio band: prefill raised to {need}"
        p = p_hi
        return p, max(d_lo, int(math.floor(p / spec.ratio_min + eps))), "ratio band: decode lowered"
    return p, d, ""


def decide(
    window: MetricsWindow | None,
    current: Replicas,
    spec: AutoscalingSpec,
    state: PolicyState,
    now: float,
) -> Decision:
    """The desired prefill and decode sizes, why, and the inputs the decision used.

    `current` is what the pools are set to now (with how many replicas are ready, if known);
    `state` is updated in place (this call's recommendations, changes); `now` is any monotonic
    clock in seconds (a state from `from_json` is first moved onto it: `PolicyState.rebase`). Call
    it every few seconds to a minute; the caller applies the sizes."""
    if state.restored:
        # The gap since the state was saved is a pause, or the skew of a clock that ran behind,
        # never told apart (see `rebase`). Each decision's window sees the one before it: a gap of
        # up to a window leaves nothing unseen. A longer one is not observed time: a cold start
        # being timed then ends somewhere in it (an hour's skew timed an hour, and the burst memory
        # measured growth over that hour), and it must not count toward a stabilization window
        # (one window after it would scale down where a fresh start watches a whole one first).
        if state.rebase(now) > spec.window_seconds:
            state.scaling_up.clear()
            state.started = None
        state.restored = False
    if state.started is None:
        state.started = now
    inputs: dict[str, Any] = {"now": now, "current": asdict(current)}
    if window is not None:
        inputs["window"] = {k: v for k, v in asdict(window).items() if v is not None}
        inputs["finished"] = window.finished
        inputs["attainment"] = window.attainment
    desired: dict[str, int] = {}
    reasons: list[str] = []
    no_data: list[str] = []
    for pool in POOLS:
        n_cur = current.get(pool)
        lo, hi = spec.bounds(pool)
        if current.ready(pool) < n_cur:
            state.settled[pool] = math.inf  # replicas still starting
        else:
            if state.settled.get(pool) == math.inf:
                state.settled[pool] = now  # all ready from now on
            up = state.scaling_up.get(pool)
            if up is not None and n_cur >= up[1]:  # (below: not applied yet, or lowered since)
                del state.scaling_up[pool]
                if pool == "prefill" and current.prefill_ready is not None:
                    state.startup_s = now - up[0]  # (at most one decision interval late)
        if window is None or (window.finished is None and not window.has_pool_data()):
            rec = _Rec(n_cur, "no metrics: holding", hold=True)
        else:
            settled = now - state.settled.get(pool, -math.inf) >= spec.window_seconds
            burst = None
            if pool == "prefill":
                fb = _attainment_feedback(window, spec, state, now)
                if fb:
                    inputs["attainment_feedback"] = fb
                if state.burst_q is not None:
                    inputs["burst_quantile"] = state.burst_q
                if spec.learn_capacity:
                    _learn_capacity(window, spec, state)
                rate = _window_rate(window)
                if rate is not None:
                    burst = _burst_rate(rate, spec, state, now)
                    inputs["prefill_sized_rate"] = burst[0]
            rec = _recommend(pool, window, current, spec, settled, state.prefill_capacity, burst)
        if rec.hold:
            no_data.append(pool)
        rec_value = min(max(rec.value, lo), hi)
        inputs[f"{pool}_recommendation"] = rec_value
        hist = state.history.setdefault(pool, deque())
        hist.append((now, rec_value))
        while hist and hist[0][0] < now - spec.stabilization_seconds:
            hist.popleft()
        why = rec.why
        if rec_value > n_cur:
            target = rec_value
        elif rec_value < n_cur:
            covered = now - state.started
            target = max(r for _, r in hist)
            if covered < spec.stabilization_seconds:
                target = n_cur
                why += f"; stabilizing ({covered:.0f}s of {spec.stabilization_seconds:.0f}s seen)"
            elif target >= n_cur:
                why += (
                    f"; stabilizing (recommended {target} within the last {spec.stabilization_seconds:.0f}s)"
                )
                target = n_cur
        else:
            target = n_cur
        if target != n_cur:
            since = now - state.last_change.get(pool, -math.inf)
            if since < spec.cooldown_seconds:
                why += f"; cooldown ({spec.cooldown_seconds - since:.0f}s left)"
                target = n_cur
        down = spec.max_step if spec.max_step_down is None else spec.max_step_down
        step = max(-down, min(spec.max_step, target - n_cur))
        target = n_cur + step
        target = min(max(target, lo), hi)  # bounds win over cooldown and step (a changed spec)
        desired[pool] = target
        reasons.append(f"{pool} {n_cur}->{target}: {why}")
    p, d, band_why = _ratio_repair(desired["prefill"], desired["decode"], spec)
    if band_why:
        reasons.append(band_why)
        desired["prefill"], desired["decode"] = p, d
    if window is not None and window.router_limited:
        reasons.append(
            f"router: {window.router_limited} of {window.finished} requests turned away at its"
            " in-flight limit (no pool is scaled up for them)"
        )
    for pool in POOLS:
        if desired[pool] != current.get(pool):
            state.last_change[pool] = now
            state.settled[pool] = math.inf
            if desired[pool] > current.get(pool):
                since = state.scaling_up.get(pool, (now, 0))[0]  # from the first of a series of steps
                state.scaling_up[pool] = (since, desired[pool])
            else:
                state.scaling_up.pop(pool, None)  # the replicas it timed may have been cancelled
    return Decision(desired["prefill"], desired["decode"], "; ".join(reasons), inputs, tuple(no_data))
