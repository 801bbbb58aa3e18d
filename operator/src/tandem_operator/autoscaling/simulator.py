"""A discrete-event simulator of a disaggregated deployment, to evaluate the autoscaling policy.

Model (it follows Tandem's request path):

* A request (arrival, prompt tokens, output tokens) goes to the decode instance the router picks
  (join-shortest-queue: fewest running + waiting), which reserves KV for prompt + output (FCFS
  while its cache is full; a request that can never fit fails). Then the prefill instance with the
  least outstanding prompt tokens prefills it: FCFS, batched up to `prefill_max_batch_tokens`.
  The first token reaches the client when the KV transfer to decode ends; decode then generates
  the rest with continuous batching (new requests join at step boundaries).
* Every `interval_s` the simulator builds a `MetricsWindow` from the last `spec.window_seconds`
  (requests finished by outcome, TTFT/TPOT percentiles, scraped pool gauges every
  `scrape_interval_s`, prompt-token arrival rate and its peak over `rate_subwindow_s`, prompt
  tokens computed per engine-busy second) and calls the same `policy.decide` the operator runs.
  New instances are billed from the decision and serve after `provisioning_s` (cold start);
  removed instances drain (no new work, finish what they hold; a still-starting one is
  cancelled) and are billed until drained.
* Outcomes as the router counts them: missed_ttft if TTFT > SLO, else missed_tpot if the mean time
  per output token after the first > SLO, else met. Requests still unfinished `drain_limit_s` after
  the last arrival count as failed.

Reported: attainment (both SLOs met / all requests), goodput (met requests per second),
TTFT/TPOT p50/p90/p99, and GPU-minutes (instance-seconds x GPUs per instance / 60).
"""

from __future__ import annotations

import bisect
import csv
import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from .latency import LatencyModel
from .policy import AutoscalingSpec, MetricsWindow, PolicyState, Replicas, decide

# ------------------------------------------------------------------------------------------ traces


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds from the trace's start
    prompt_tokens: int
    output_tokens: int


def load_azure_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """The Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens), times from 0.

    Source: Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting",
    ISCA 2024; github.com/Azure/AzurePublicDataset, CC-BY 4.0."""
    out: list[TraceRequest] = []
    t0 = None
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            ts = row["TIMESTAMP"].strip()
            # Seven fractional digits: more than fromisoformat takes before Python 3.11.
            head, _, frac = ts.partition(".")
            t = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp() + float("0." + (frac or "0"))
            if t0 is None:
                t0 = t
            out.append(
                TraceRequest(t - t0, max(1, int(row["ContextTokens"])), max(1, int(row["GeneratedTokens"])))
            )
            if limit is not None and len(out) >= limit:
                break
    out.sort(key=lambda r: r.arrival)
    return out


def synthetic_trace(
    rate: float,
    duration_s: float,
    prompt: tuple[int, int] = (256, 4096),
    output: tuple[int, int] = (8, 128),
    seed: int = 0,
    start: float = 0.0,
) -> list[TraceRequest]:
    """Poisson arrivals at `rate` per second; uniform prompt and output lengths."""
    rng = random.Random(seed)
    t, out = start, []
    while True:
        t += rng.expovariate(rate)
        if t >= start + duration_s:
            return out
        out.append(TraceRequest(t, rng.randint(*prompt), rng.randint(*output)))


def window_of(trace: Sequence[TraceRequest], start: float, end: float) -> list[TraceRequest]:
    """The requests arriving in [start, end), shifted to start at 0."""
    return [
        TraceRequest(r.arrival - start, r.prompt_tokens, r.output_tokens)
        for r in trace
        if start <= r.arrival < end
    ]


def peak_minute(trace: Sequence[TraceRequest]) -> float:
    """Start (s) of the whole minute with the most prompt tokens arriving (prefill demand)."""
    per: dict[int, int] = {}
    for r in trace:
        per[int(r.arrival // 60)] = per.get(int(r.arrival // 60), 0) + r.prompt_tokens
    return 60.0 * max(per, key=lambda m: (per[m], -m))


# --------------------------------------------------------------------------------------- simulator


@dataclass
class _Req:
    i: int
    arrival: float
    prompt: int
    output: int
    decode: _Instance | None = None
    first_token: float | None = None
    done: float | None = None
    failed: bool = False
    generated: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival  # type: ignore[operator]

    @property
    def tpot(self) -> float:
        return 0.0 if self.output <= 1 else (self.done - self.first_token) / (self.output - 1)  # type: ignore[operator]


@dataclass(eq=False)
class _Instance:
    role: str
    i: int
    created: float
    ready_at: float
    gpus: int
    stopped: float | None = None
    draining: bool = False
    # prefill
    queue: deque = field(default_factory=deque)
    queued_tokens: int = 0
    busy: bool = False
    batch_tokens: int = 0
    batch_start: float = 0.0
    # decode
    running: list = field(default_factory=list)
    joining: list = field(default_factory=list)
    waiting: deque = field(default_factory=deque)
    kv_used: int = 0
    incoming: int = 0  # admitted (KV reserved), not yet running
    stepping: bool = False

    def ready(self, now: float) -> bool:
        return self.stopped is None and not self.draining and now >= self.ready_at

    def idle(self) -> bool:
        if self.role == "prefill":
            return not self.queue and not self.busy
        return not (self.running or self.joining or self.waiting or self.incoming)


@dataclass
class SimConfig:
    spec: AutoscalingSpec = field(default_factory=AutoscalingSpec)
    latency: LatencyModel = field(default_factory=LatencyModel)
    prefill: int = 1  # initial (or static) sizes
    decode: int = 1
    autoscale: bool = True
    interval_s: float = 15.0  # how often the policy runs
    scrape_interval_s: float = 5.0
    rate_subwindow_s: float = 10.0
    provisioning_s: float = 60.0  # cold start of a new instance
    drain_limit_s: float = 900.0  # after the last arrival; then unfinished requests fail
    arrival_rate_metric: bool = True  # the router counts arriving prompt tokens (else: computed only)
    seed: int = 0


@dataclass
class SimResult:
    requests: int
    met: int
    missed_ttft: int
    missed_tpot: int
    failed: int
    duration_s: float
    gpu_seconds: float
    ttft: dict[str, float]
    tpot: dict[str, float]
    decisions: list[tuple[float, int, int, str]]
    sizes: list[tuple[float, int, int]]  # (time, prefill, decode) billed instances after each change
    max_prefill: int = 0
    max_decode: int = 0

    @property
    def attainment(self) -> float:
        return self.met / self.requests if self.requests else 1.0

    @property
    def goodput(self) -> float:
        return self.met / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def gpu_minutes(self) -> float:
        return self.gpu_seconds / 60.0


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of an ascending list; None when empty."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


_ARRIVE, _PREFILL_DONE, _TRANSFER_DONE, _STEP, _READY, _SCRAPE, _DECIDE = range(7)


# At a decision time: the (prefill, decode) sizes to set, in place of the policy.
Schedule = Callable[[float], tuple[int, int]]


class Simulator:
    def __init__(
        self, trace: Iterable[TraceRequest], config: SimConfig, schedule: Schedule | None = None
    ) -> None:
        self.cfg = config
        self.schedule = schedule
        self.lat = config.latency
        self.spec = config.spec
        self.rng = random.Random(config.seed)
        self.reqs = [
            _Req(i, r.arrival, r.prompt_tokens, r.output_tokens)
            for i, r in enumerate(sorted(trace, key=lambda r: r.arrival))
        ]
        self.events: list = []
        self.seq = 0
        self.now = 0.0
        self.instances: dict[str, list[_Instance]] = {"prefill": [], "decode": []}
        self.retired: list[_Instance] = []
        self.router_wait: deque = deque()  # no ready decode instance
        self.prefill_wait: deque = deque()  # no ready prefill instance
        self.finished: list[tuple[float, _Req]] = []  # (finish time, request), in time order
        self.arrivals_t: list[float] = []
        self.arrivals_cum: list[int] = [0]
        self.computed_t: list[float] = []  # prefill batch completions
        self.computed_cum: list[int] = [0]  # prompt tokens computed
        self.busy_cum: list[float] = [0.0]  # prefill engine-busy seconds
        self.scrapes: deque = deque()
        self.state = PolicyState()
        self.decisions: list[tuple[float, int, int, str]] = []
        self.sizes: list[tuple[float, int, int]] = []
        self.max_sizes = {"prefill": 0, "decode": 0}
        self.n_inst = 0

    # -- plumbing
    def _push(self, t: float, kind: int, obj=None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, obj))

    def _active(self, role: str) -> list[_Instance]:
        return [x for x in self.instances[role] if not x.draining]

    def _add(self, role: str, ready_at: float) -> None:
        self.n_inst += 1
        gpus = self.lat.prefill_gpus if role == "prefill" else self.lat.decode_gpus
        inst = _Instance(role, self.n_inst, self.now, ready_at, gpus)
        self.instances[role].append(inst)
        if ready_at > self.now:
            self._push(ready_at, _READY, inst)

    def _retire(self, inst: _Instance) -> None:
        inst.stopped = self.now
        self.instances[inst.role].remove(inst)
        self.retired.append(inst)

    def _remove_one(self, role: str) -> None:
        act = self._active(role)
        starting = [x for x in act if self.now < x.ready_at]
        if starting:
            victim = max(starting, key=lambda x: x.ready_at)
            self._retire(victim)
            return
        victim = min(
            act,
            key=lambda x: (
                x.queued_tokens + x.batch_tokens
                if role == "prefill"
                else len(x.running) + len(x.joining) + len(x.waiting) + x.incoming,
                -x.i,
            ),
        )
        victim.draining = True
        if victim.idle():
            self._retire(victim)

    def _record_sizes(self) -> None:
        p, d = len(self.instances["prefill"]), len(self.instances["decode"])
        self.max_sizes["prefill"] = max(self.max_sizes["prefill"], p)
        self.max_sizes["decode"] = max(self.max_sizes["decode"], d)
        self.sizes.append((self.now, p, d))

    # -- request path
    def _route(self, req: _Req) -> None:
        ready = [x for x in self.instances["decode"] if x.ready(self.now)]
        if not ready:
            self.router_wait.append(req)
            return
        best = min(len(x.running) + len(x.joining) + len(x.waiting) + x.incoming for x in ready)
        choice = self.rng.choice(
            [x for x in ready if len(x.running) + len(x.joining) + len(x.waiting) + x.incoming == best]
        )
        req.decode = choice
        choice.waiting.append(req)
        self._admit(choice)

    def _admit(self, inst: _Instance) -> None:
        while inst.waiting:
            req = inst.waiting[0]
            need = req.prompt + req.output
            if inst.kv_used + need > self.lat.kv_capacity_tokens:
                break
            inst.waiting.popleft()
            inst.kv_used += need
            inst.incoming += 1
            self._to_prefill(req)

    def _to_prefill(self, req: _Req) -> None:
        ready = [x for x in self.instances["prefill"] if x.ready(self.now)]
        if not ready:
            self.prefill_wait.append(req)
            return
        best = min(x.queued_tokens + x.batch_tokens for x in ready)
        inst = self.rng.choice([x for x in ready if x.queued_tokens + x.batch_tokens == best])
        inst.queue.append(req)
        inst.queued_tokens += req.prompt
        self._start_prefill(inst)

    def _start_prefill(self, inst: _Instance) -> None:
        if inst.busy or not inst.queue:
            return
        batch, tokens = [], 0
        while inst.queue and (
            not batch or tokens + inst.queue[0].prompt <= self.lat.prefill_max_batch_tokens
        ):
            r = inst.queue.popleft()
            batch.append(r)
            tokens += r.prompt
        inst.queued_tokens -= tokens
        inst.busy, inst.batch_tokens, inst.batch_start = True, tokens, self.now
        self._push(self.now + self.lat.prefill_time([r.prompt for r in batch]), _PREFILL_DONE, (inst, batch))

    def _prefill_done(self, inst: _Instance, batch: list[_Req]) -> None:
        self.computed_t.append(self.now)
        self.computed_cum.append(self.computed_cum[-1] + inst.batch_tokens)
        self.busy_cum.append(self.busy_cum[-1] + self.now - inst.batch_start)
        inst.busy, inst.batch_tokens = False, 0
        for r in batch:
            self._push(self.now + self.lat.transfer_time(r.prompt), _TRANSFER_DONE, r)
        self._start_prefill(inst)
        if inst.draining and inst.idle():
            self._retire(inst)

    def _transfer_done(self, req: _Req) -> None:
        req.first_token = self.now
        req.generated = 1
        inst = req.decode
        inst.incoming -= 1  # type: ignore[union-attr]
        if req.output <= 1:
            self._finish(req)
            return
        inst.joining.append(req)  # type: ignore[union-attr]
        self._start_step(inst)  # type: ignore[arg-type]

    def _start_step(self, inst: _Instance) -> None:
        if inst.stepping:
            return
        if inst.joining:
            room = self.lat.decode_max_batch - len(inst.running)
            inst.running.extend(inst.joining[:room])
            del inst.joining[:room]
        if not inst.running:
            return
        ctx = sum(r.prompt + r.generated for r in inst.running)
        inst.stepping = True
        self._push(self.now + self.lat.decode_step_time(len(inst.running), ctx), _STEP, inst)

    def _step(self, inst: _Instance) -> None:
        inst.stepping = False
        still = []
        for r in inst.running:
            r.generated += 1
            if r.generated >= r.output:
                self._finish(r)
            else:
                still.append(r)
        inst.running = still
        self._start_step(inst)

    def _finish(self, req: _Req) -> None:
        req.done = self.now
        inst = req.decode
        if inst is not None:
            inst.kv_used -= req.prompt + req.output
            self._admit(inst)
            if inst.draining and inst.idle() and inst.stopped is None:
                self._retire(inst)
        self.finished.append((self.now, req))

    def _fail(self, req: _Req) -> None:
        req.failed = True
        req.done = self.now
        self.finished.append((self.now, req))

    def _arrive(self, req: _Req) -> None:
        self.arrivals_t.append(self.now)
        self.arrivals_cum.append(self.arrivals_cum[-1] + req.prompt)
        if req.prompt + req.output > self.lat.kv_capacity_tokens:
            self._fail(req)
            return
        self._route(req)

    def _ready(self, inst: _Instance) -> None:
        if inst.stopped is not None:
            return
        if inst.role == "decode":
            waiting, self.router_wait = self.router_wait, deque()
            for r in waiting:
                self._route(r)
        else:
            waiting, self.prefill_wait = self.prefill_wait, deque()
            for r in waiting:
                self._to_prefill(r)

    # -- metrics and policy
    def _scrape(self) -> None:
        pre = [x for x in self.instances["prefill"] if x.ready(self.now)]
        dec = [x for x in self.instances["decode"] if x.ready(self.now)]
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
        backlog = [x.queued_tokens + x.batch_tokens for x in pre]
        kv = [x.kv_used / self.lat.kv_capacity_tokens for x in dec]
        # Columns 7 and 8, the busiest replica's, make the window's `*_max` what Prometheus' and
        # scrape.py's are (max over replicas and scrapes), not the highest pool mean.
        self.scrapes.append(
            (
                self.now,
                mean(backlog),
                mean([(1 if x.busy else 0) for x in pre]),
                mean([len(x.queue) for x in pre]),
                mean(kv),
                mean([len(x.running) + len(x.joining) for x in dec]),
                mean([len(x.waiting) for x in dec]) + len(self.router_wait),
                max(backlog, default=0.0),
                max(kv, default=0.0),
            )
        )
        while self.scrapes and self.scrapes[0][0] < self.now - self.spec.window_seconds:
            self.scrapes.popleft()

    def _peak_rate(self, times: list[float], cum: list[int], lo: float) -> float:
        """The highest rate over consecutive sub-windows of (lo, now]."""
        peak, sub, t = 0.0, self.cfg.rate_subwindow_s, lo
        while t < self.now - 1e-9:
            s, e = bisect.bisect_right(times, t), bisect.bisect_right(times, t + sub)
            peak = max(peak, (cum[e] - cum[s]) / sub)
            t += sub
        return peak

    def window(self) -> MetricsWindow:
        w = self.spec.window_seconds
        lo = self.now - w
        i = bisect.bisect_right(self.finished, lo, key=lambda x: x[0])
        met, mt, mp, failed, ttfts, tpots = _tally((r for _, r in self.finished[i:]), self.spec)
        a = bisect.bisect_right(self.arrivals_t, lo)
        total = self.arrivals_cum[-1] - self.arrivals_cum[a]
        peak = self._peak_rate(self.arrivals_t, self.arrivals_cum, lo)
        c = bisect.bisect_right(self.computed_t, lo)
        busy = self.busy_cum[-1] - self.busy_cum[c]
        per_busy_s = (self.computed_cum[-1] - self.computed_cum[c]) / busy if busy > 0 else None
        sc = list(self.scrapes)
        col = lambda k: [s[k] for s in sc]
        avg = lambda xs: sum(xs) / len(xs) if xs else None
        return MetricsWindow(
            duration_s=w,
            met=met,
            missed_ttft=mt,
            missed_tpot=mp,
            failed=failed,
            ttft_p50_s=percentile(ttfts, 50),
            ttft_p90_s=percentile(ttfts, 90),
            ttft_p99_s=percentile(ttfts, 99),
            tpot_p50_s=percentile(tpots, 50),
            tpot_p90_s=percentile(tpots, 90),
            tpot_p99_s=percentile(tpots, 99),
            prefill_backlog_tokens=avg(col(1)),
            prefill_backlog_tokens_max=max(col(7)) if sc else None,
            prompt_tokens_per_s=total / w if self.cfg.arrival_rate_metric else None,
            prompt_tokens_per_s_peak=peak if self.cfg.arrival_rate_metric else None,
            prefill_tokens_per_busy_s=per_busy_s,
            prefill_running=avg(col(2)),
            prefill_waiting=avg(col(3)),
            decode_kv_usage=avg(col(4)),
            decode_kv_usage_max=max(col(8)) if sc else None,
            decode_running=avg(col(5)),
            decode_waiting=avg(col(6)),
        )

    def replicas(self) -> Replicas:
        p, d = self._active("prefill"), self._active("decode")
        return Replicas(
            len(p), len(d), sum(self.now >= x.ready_at for x in p), sum(self.now >= x.ready_at for x in d)
        )

    def _decide(self) -> None:
        cur = self.replicas()
        if self.schedule is not None:
            p, d = self.schedule(self.now)
            reason = "schedule"
        else:
            dec = decide(self.window(), cur, self.spec, self.state, self.now)
            p, d, reason = dec.desired_prefill, dec.desired_decode, dec.reason
        for role, want in (("prefill", p), ("decode", d)):
            delta = want - cur.get(role)
            for _ in range(max(delta, 0)):
                self._add(role, self.now + self.cfg.provisioning_s)
            for _ in range(max(-delta, 0)):
                self._remove_one(role)
        if p != cur.prefill or d != cur.decode:
            self.decisions.append((self.now, p, d, reason))
            self._record_sizes()

    # -- run
    def run(self) -> SimResult:
        for _ in range(self.cfg.prefill):
            self._add("prefill", 0.0)
        for _ in range(self.cfg.decode):
            self._add("decode", 0.0)
        self._record_sizes()
        for r in self.reqs:
            self._push(r.arrival, _ARRIVE, r)
        last_arrival = self.reqs[-1].arrival if self.reqs else 0.0
        limit = last_arrival + self.cfg.drain_limit_s
        self._push(0.0, _SCRAPE)
        if self.cfg.autoscale:
            self._push(self.cfg.interval_s, _DECIDE)
        pending = len(self.reqs)
        handlers = {
            _ARRIVE: self._arrive,
            _TRANSFER_DONE: self._transfer_done,
            _STEP: self._step,
            _READY: self._ready,
        }
        while self.events:
            t, _, kind, obj = heapq.heappop(self.events)
            if t > limit:
                break
            self.now = t
            if kind == _PREFILL_DONE:
                self._prefill_done(*obj)
            elif kind == _SCRAPE:
                self._scrape()
                if len(self.finished) < pending:
                    self._push(t + self.cfg.scrape_interval_s, _SCRAPE)
            elif kind == _DECIDE:
                if len(self.finished) < pending:
                    self._decide()
                    self._push(t + self.cfg.interval_s, _DECIDE)
            else:
                handlers[kind](obj)
            if len(self.finished) >= pending and not self.events:
                break
        end = max(last_arrival, self.now)
        self.now = end
        for r in self.reqs:
            if r.done is None:
                self._fail(r)
        return self._result(end)

    def _result(self, end: float) -> SimResult:
        met, mt, mp, failed, ttfts, tpots = _tally(self.reqs, self.spec)
        gpu_s = sum(
            ((x.stopped if x.stopped is not None else end) - x.created) * x.gpus
            for x in self.retired + self.instances["prefill"] + self.instances["decode"]
        )
        pct = lambda xs: {f"p{q}": percentile(xs, q) for q in (50, 90, 99)}
        return SimResult(
            requests=len(self.reqs),
            met=met,
            missed_ttft=mt,
            missed_tpot=mp,
            failed=failed,
            duration_s=end,
            gpu_seconds=gpu_s,
            ttft=pct(ttfts),
            tpot=pct(tpots),
            decisions=self.decisions,
            sizes=self.sizes,
            max_prefill=self.max_sizes["prefill"],
            max_decode=self.max_sizes["decode"],
        )


def simulate(trace: Iterable[TraceRequest], config: SimConfig, schedule: Schedule | None = None) -> SimResult:
    """Run `trace` through the deployment `config` describes, sized by the policy (or by `schedule`
    at each decision time, when given, or fixed when `config.autoscale` is off)."""
    return Simulator(trace, config, schedule).run()


def fixed_run(trace: Sequence[TraceRequest], config: SimConfig, prefill: int, decode: int) -> SimResult:
    """`trace` on a static deployment of `prefill` and `decode` instances."""
    return simulate(trace, replace(config, prefill=prefill, decode=decode, autoscale=False))


def smallest_prefill(
    trace: Sequence[TraceRequest], config: SimConfig, decode: int, max_prefill: int = 64
) -> tuple[int, SimResult] | None:
    """The smallest static prefill size (with `decode` instances) whose run of `trace` meets the
    spec's attainment target, and that run; None if `max_prefill` does not."""
    target = config.spec.attainment
    best = fixed_run(trace, config, max_prefill, decode)
    if best.attainment < target:
        return None
    lo, hi = 1, max_prefill  # attainment is monotone in P for a fixed D (checked by the tests)
    while lo < hi:
        mid = (lo + hi) // 2
        r = fixed_run(trace, config, mid, decode)
        if r.attainment >= target:
            hi, best = mid, r
        else:
            lo = mid + 1
    return lo, best


def replay_learner(
    trace: Sequence[TraceRequest],
    config: SimConfig,
    decode: int,
    target: float,
    every_s: float = 60.0,
    max_prefill: int = 64,
) -> tuple[SimResult, list[tuple[float, int]]]:
    """A reference for online policies: size prefill from an exact replay of everything seen so far.

    Every `every_s` it sets prefill to the smallest fixed size whose run of all requests that have
    arrived so far would have met `target` (the largest, `max_prefill`, if none does); new
    instances serve after `config.provisioning_s` like the policy's. It knows more than a policy
    can (every past arrival exactly, and their output lengths), but nothing of the future, so it
    shows what learning the load online costs: it misses the bursts larger than any it has seen,
    and keeps paying for the largest it has seen. Returns its run and its (time, prefill) steps."""
    found = config.prefill
    steps: list[tuple[float, int]] = []
    end = trace[-1].arrival if trace else 0.0
    sized = replace(config, spec=replace(config.spec, attainment=target))
    t = every_s
    while t <= end:
        seen = window_of(trace, 0.0, t)
        if len(seen) >= config.spec.min_requests:
            found = _smallest_near(seen, sized, decode, found, max_prefill)
        steps.append((t, found))
        t += every_s

    def schedule(now: float) -> tuple[int, int]:  # called at every_s, 2 * every_s, ...
        k = min(round(now / every_s), len(steps)) - 1
        return (steps[k][1] if k >= 0 else config.prefill), decode

    run = simulate(trace, replace(config, decode=decode, autoscale=True, interval_s=every_s), schedule)
    return run, steps


def _smallest_near(
    trace: Sequence[TraceRequest], config: SimConfig, decode: int, start: int, most: int
) -> int:
    """`smallest_prefill`, searching from `start` (the last size, usually right or one off)."""

    def meets(p: int) -> bool:
        return fixed_run(trace, config, p, decode).attainment >= config.spec.attainment

    p = max(1, min(start, most))
    if meets(p):
        while p > 1 and meets(p - 1):
            p -= 1
        return p
    while p < most and not meets(p + 1):
        p += 1
    return min(p + 1, most)


def static_peak_size(
    trace: Sequence[TraceRequest],
    config: SimConfig,
    max_prefill: int = 64,
    max_decode: int = 16,
) -> tuple[int, int, float, SimResult]:
    """The cheapest static (P, D) meeting the attainment target on the trace's peak minute alone.

    Returns (P, D, the peak minute's start, that minute's result)."""
    start = peak_minute(trace)
    minute = window_of(trace, start, start + 60.0)
    lat = config.latency
    best: tuple[int, int, SimResult] | None = None
    for d in range(1, max_decode + 1):
        if best is not None and d * lat.decode_gpus + lat.prefill_gpus >= (
            best[0] * lat.prefill_gpus + best[1] * lat.decode_gpus
        ):
            break
        found = smallest_prefill(minute, config, d, max_prefill)
        if found is None:
            continue
        p, result = found
        cost = p * lat.prefill_gpus + d * lat.decode_gpus
        if best is None or cost < best[0] * lat.prefill_gpus + best[1] * lat.decode_gpus:
            best = (p, d, result)
    if best is None:
        raise ValueError(
            f"no static size up to P={max_prefill}, D={max_decode} meets the target on the peak minute"
        )
    return best[0], best[1], start, best[2]


def _tally(reqs, spec: AutoscalingSpec) -> tuple[int, int, int, int, list[float], list[float]]:
    """(met, missed TTFT, missed TPOT, failed, sorted TTFTs, sorted TPOTs) of finished requests,
    judged as the router judges them."""
    ttft_s, tpot_s = spec.ttft_ms / 1000.0, spec.tpot_ms / 1000.0
    met = mt = mp = failed = 0
    ttfts: list[float] = []
    tpots: list[float] = []
    for r in reqs:
        if r.failed:
            failed += 1
            continue
        ttfts.append(r.ttft)
        if r.output > 1:
            tpots.append(r.tpot)
        if r.ttft > ttft_s:
            mt += 1
        elif r.tpot > tpot_s:
            mp += 1
        else:
            met += 1
    ttfts.sort()
    tpots.sort()
    return met, mt, mp, failed, ttfts, tpots
