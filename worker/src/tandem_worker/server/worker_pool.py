"""`WorkerPool`: the router's view of its workers: discovery, health and load, and pair picking.

Targets are `host:port` (a static worker), `dns:NAME:PORT` (every address NAME resolves to, e.g.
a Kubernetes headless Service, re-resolved on each refresh) or `file:PATH` (the `host:port` lines of
a file, re-read on each refresh: `tandem up --autoscale` rewrites it as it adds and removes
workers). A background thread health-checks each worker with the standard gRPC health service and
reads its `Admin.Stats`; a worker is eligible only while both answer and it is not draining.

A failed request takes a worker out of rotation for a while even when it still answers health
checks (outlier ejection, as Envoy's): a prefill worker that is up but stalls its KV streams would
otherwise be picked again within half a second, each time costing a request its KV idle timeout.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import metrics
from .pb import worker_pb2 as wpb
from .pb import worker_pb2_grpc as wgrpc

log = logging.getLogger(__name__)

# Workers come and go (start-up, restarts, rescheduled pods): reconnect within a second instead of
# after gRPC's default exponential backoff (up to two minutes), during which every call on the
# channel fails at once with UNAVAILABLE even though the worker is back.
#
# Keepalive pings while calls are open: a peer that vanished without a reset (its node lost power,
# a network partition, a frozen process) otherwise leaves a stream waiting forever, holding the
# router's in-flight slot and the decode worker's reserved KV. Failed within KEEPALIVE_TIME_MS +
# KEEPALIVE_TIMEOUT_MS, it ends with UNAVAILABLE. Pings may come without data (a stream waits
# through a long prefill): the worker servers allow that (SERVER_KEEPALIVE_OPTIONS), else they
# would answer with GOAWAY "too_many_pings".
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # gRPC core (1.85) waits for a keepalive ping's answer up to its ping timeout (60 s unless set),
    # not the keepalive timeout: measured, a frozen peer's stream ended after 70 s without this.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_KEEPALIVE_OPTIONS = [
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
]


@dataclass
class WorkerInfo:
    address: str
    channel: grpc.Channel
    healthy: bool = False
    # What its last health check said: `healthy` as `mark_failed` leaves it (the router's readiness
    # follows the checks alone).
    checked_healthy: bool = False
    stats: wpb.StatsResponse | None = None
    # Router-side load not yet visible in the worker's stats: prompt tokens per attempt (by the
    # ticket `WorkerPool.begin` gave it), until the attempt ends or stats taken after it began.
    pending: dict[int, int] = field(default_factory=dict)
    pending_requests: int = 0
    error: str = ""
    # Request-path failures in a row (`WorkerPool.mark_failed`; those while it already backs off,
    # and those of attempts begun before the last one, count as one), each doubling its time out of
    # rotation: until `backoff_until` on the pool's clock. `failed_ticket`: the first ticket
    # `WorkerPool.begin` gave after the last one; only an attempt from then on vouches for the
    # worker (`WorkerPool.succeeded`) or counts against it.
    failures: int = 0
    backoff_until: float = 0.0
    failed_ticket: int = 0
    # A decode worker's failed KV pulls (UNAVAILABLE naming the prefill worker) since it last served
    # a request: prefill worker address -> when, on the pool's clock (`WorkerPool.blame_pull_fault`).
    pull_faults: dict[str, float] = field(default_factory=dict)
    # time.monotonic() when the request for the current stats was sent, and when an attempt on this
    # worker last ended: stats asked for before that may still count the attempt's KV blocks.
    stats_asked_at: float = 0.0
    ended_at: float = 0.0

    @property
    def pending_tokens(self) -> int:
        return sum(self.pending.values())

    @property
    def role(self) -> str:
        return self.stats.role if self.stats else ""

    @property
    def eligible(self) -> bool:
        return self.healthy and self.stats is not None and not self.stats.draining

    def state(self, now: float) -> str:
        """What the router makes of the worker at `now` (on the pool's clock), as
        `tandem_router_workers{state}` reports it: serving (gets new work), backoff (answers its
        health checks but is out of rotation after a failed request: until its backoff is over and
        a health check since has passed; still tried when no worker in rotation could take a
        request), draining (reports it: finishes what it holds, takes nothing new) or unavailable
        (fails its health checks, or not reached yet)."""
        if self.stats is None:
            return "unavailable"
        if self.stats.draining and (self.healthy or self.checked_healthy):
            return "draining"  # also when a request failed on it since: it is on its way out anyway
        if self.eligible:
            return "backoff" if now < self.backoff_until else "serving"
        # Unhealthy as `mark_failed` left it, though its last health check passed.
        return "backoff" if self.checked_healthy else "unavailable"

    def free_tokens(self) -> int:
        if not self.stats:
            return 0
        return self.stats.free_blocks * self.stats.block_size - self.pending_tokens


def _serving(w: WorkerInfo, as_checked: bool) -> bool:
    """`w.eligible`, or as its last health check left it (`as_checked`)."""
    return w.eligible or (as_checked and w.checked_healthy and w.stats is not None and not w.stats.draining)


def _residency(w: WorkerInfo, adapter: str) -> int:
    """2: the adapter is in the worker's device memory, 1: in its host memory, 0: neither."""
    if not adapter or w.stats is None:
        return 0
    if adapter in w.stats.adapters_device:
        return 2
    return 1 if adapter in w.stats.adapters_host else 0


def _capacity(w: WorkerInfo) -> int:
    """Tokens of KV the worker's whole cache holds."""
    return w.stats.num_blocks * w.stats.block_size if w.stats else 0


def _holds(w: WorkerInfo, prompt_tokens: int) -> bool:
    """The prompt fits the worker's KV cache and context at all (a prefill worker holds all of it)."""
    s = w.stats
    return _capacity(w) >= prompt_tokens and (not s.max_model_len or prompt_tokens < s.max_model_len)


def _applies(w: WorkerInfo, controls: frozenset[str]) -> bool:
    """The worker applies these sampling controls (one of an older build drops them in silence)."""
    return not controls or controls <= set(w.stats.sampling_controls)


def _kv_compatible(prefill: WorkerInfo, decode: WorkerInfo) -> bool:
    """The decode worker would take the prefill worker's KV (the transfer's layout check)."""
    p, d = prefill.stats, decode.stats
    return p.model_id == d.model_id and p.block_size == d.block_size


def resolve(target: str) -> list[str]:
    """`host:port` as is; `dns:NAME:PORT` to one `ip:port` per address NAME resolves to now;
    `file:PATH` to the file's non-empty, non-comment lines (none while it is missing)."""
    if target.startswith("file:"):
        try:
            with open(target[5:], encoding="utf-8") as f:
                lines = [ln.strip() for ln in f]
        except OSError:
            return []
        return [ln for ln in lines if ln and not ln.startswith("#")]
    if not target.startswith("dns:"):
        return [target]
    name, _, port = target[4:].rpartition(":")
    try:
        infos = socket.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    addrs = []
    for family, *_, sockaddr in infos:
        host = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]
        addrs.append(f"{host}:{sockaddr[1]}")
    return sorted(set(addrs))


DECODE_ROLES = ("decode", "colocated")  # the roles a decode target may serve as


@dataclass
class Pair:
    decode: WorkerInfo
    prefill: WorkerInfo | None  # None: a colocated worker does both


@dataclass
class WorkerPool:
    decode_targets: list[str]  # decode or colocated workers
    prefill_targets: list[str] = field(default_factory=list)
    interval: float = 0.5
    check_timeout: float = 1.0
    # Out of rotation after a request-path failure: backoff_base seconds, doubled with each further
    # failure up to backoff_max; backoff_reset seconds back in rotation without one start it over.
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    backoff_reset: float = 60.0
    clock: Callable[[], float] = time.monotonic  # for the backoff; tests pass their own

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerInfo] = {}
        self._decode: list[str] = []
        self._prefill: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-pool", daemon=True)
        self._ready = threading.Event()
        self._next_ticket = 1  # begin's next attempt ticket; a check clears those below its own
        self._recheck_lock = threading.Lock()
        # Workers whose address left the targets while attempts still ran on them: a scaled-down or
        # rolled pod leaves its headless Service's DNS at once, while it drains (finishes what it
        # holds). Never picked; their channels stay open until those attempts end, as closing one
        # cancels every call on it: the drain was there to spare those answers.
        self._leaving: dict[str, WorkerInfo] = {}
        # Why no request could be served, as of the last refresh (None: a pair could serve one).
        self._problem: str | None = "no worker has answered a health check yet"

    def start(self) -> WorkerPool:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for w in [*self._workers.values(), *self._leaving.values()]:
                w.channel.close()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def snapshot(self) -> list[WorkerInfo]:
        with self._lock:
            return list(self._workers.values())

    # --- refresh -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.interval)

    def refresh(self) -> None:
        decode = [a for t in self.decode_targets for a in resolve(t)]
        prefill = [a for t in self.prefill_targets for a in resolve(t)]
        with self._lock:
            for addr in {*decode, *prefill} - self._workers.keys():
                back = self._leaving.pop(addr, None)
                self._workers[addr] = back or WorkerInfo(
                    addr, grpc.insecure_channel(addr, options=RECONNECT_OPTIONS)
                )
            for addr in self._workers.keys() - {*decode, *prefill}:
                self._leaving[addr] = self._workers.pop(addr)
            gone = [a for a, w in self._leaving.items() if w.pending_requests == 0]
            closing = [self._leaving.pop(a) for a in gone]
            self._decode, self._prefill = decode, prefill
            workers = list(self._workers.values())
        for w in closing:
            w.channel.close()
        for w in workers:
            self._check(w)
        if any(w.eligible for w in workers):
            self._ready.set()
        # From the health checks alone: mark_failed (one failed attempt) must not flip the router's
        # readiness, which the next check may well restore; nor while this refresh checks the
        # other workers, after its own check.
        self._problem = self.serving_problem(as_checked=True)

    def readiness_problem(self) -> str | None:
        """`serving_problem()` as of the last refresh: what the router's readiness reports."""
        return self._problem

    def _check(self, w: WorkerInfo) -> None:
        with self._lock:
            # Attempts begun from here on may not be in the stats this check gets back.
            seen_before = self._next_ticket
        asked_at = time.monotonic()
        try:
            resp = health_pb2_grpc.HealthStub(w.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.check_timeout
            )
            stats = wgrpc.AdminStub(w.channel).Stats(wpb.StatsRequest(), timeout=self.check_timeout)
        except grpc.RpcError as e:
            if w.healthy:
                log.warning(
                    "worker %s is unavailable: %s", w.address, e.details() if hasattr(e, "details") else e
                )
            w.healthy = w.checked_healthy = False
            w.error = str(e.code()) if hasattr(e, "code") else str(e)
            return
        w.healthy = w.checked_healthy = resp.status == health_pb2.HealthCheckResponse.SERVING
        w.stats = stats
        w.stats_asked_at = asked_at
        w.error = ""
        with self._lock:
            # The fresh stats include what we had sent; keep only what may not have reached them.
            for ticket in [t for t in w.pending if t < seen_before]:
                del w.pending[ticket]

    def recheck_decodes(self) -> None:
        """Fresh stats from the eligible decode workers on which an attempt ended since their stats
        were asked for: before a request is refused for want of KV room, which stats taken while an
        earlier request still held its blocks would claim (a worker frees a request's blocks before
        it sends the request's last message). One caller at a time; the others wait for it and
        then find the stats fresh."""
        with self._recheck_lock:
            decodes, _ = self._targets()
            stale = [w for w in decodes if w.eligible and w.stats_asked_at <= w.ended_at]
            for w in stale:
                self._check(w)

    # --- picking -------------------------------------------------------------------------------

    def _targets(self) -> tuple[list[WorkerInfo], list[WorkerInfo]]:
        """The current decode (or colocated) and prefill workers, as the last refresh resolved them."""
        with self._lock:
            return (
                [self._workers[a] for a in self._decode if a in self._workers],
                [self._workers[a] for a in self._prefill if a in self._workers],
            )

    def mark_failed(self, w: WorkerInfo, why: str, ticket: int | None = None) -> None:
        """A request failed on the worker (its attempt had `ticket` from `begin`): out of rotation
        until its next successful health check and, whatever those say, for a backoff that doubles
        with each failure in a row (`backoff_base` .. `backoff_max` seconds), unless all that could
        serve a request are (`_rested`)."""
        now = self.clock()
        with self._lock:
            w.healthy = False
            w.error = why
            if now < w.backoff_until or (ticket is not None and ticket < w.failed_ticket):
                # No new evidence: one of the attempts it held when it last failed, or one picked
                # only because all that could serve its request are out (`_rested`). A stalled
                # worker fails all it held, each at its own KV idle timeout (seconds apart: each
                # pull's last heartbeat), so often after a first backoff is over: ten requests
                # stalled together would otherwise push it out for a long backoff at its first fault.
                return
            if now - w.backoff_until >= self.backoff_reset:
                w.failures = 0  # a fault long after the last one: a new incident, not a streak
            w.failures += 1
            backoff = min(self.backoff_base * 2 ** min(w.failures - 1, 30), self.backoff_max)
            w.backoff_until = now + backoff
            w.failed_ticket = self._next_ticket
        metrics.WORKER_EJECTIONS.labels(role=w.role or "unknown").inc()
        log.warning(
            "worker %s out of rotation for %.0f s (%d failure(s) in a row): %s",
            w.address,
            backoff,
            w.failures,
            why,
        )

    def blame_pull_fault(self, pair: Pair) -> WorkerInfo:
        """The worker to take out when `pair`'s decode worker could not pull the prompt's KV from
        its prefill partner (UNAVAILABLE naming it): the prefill worker, unless the decode worker's
        pulls from another prefill worker failed too within `backoff_reset` seconds, with no request
        served in between; then what the failures share is the decode worker (its network, say).
        Blaming each prefill worker in turn would empty their pool for one broken decode worker."""
        now = self.clock()
        with self._lock:
            faults = pair.decode.pull_faults
            for address, at in list(faults.items()):
                if now - at >= self.backoff_reset:
                    del faults[address]
            faults[pair.prefill.address] = now
            return pair.decode if len(faults) >= 2 else pair.prefill

    def succeeded(self, pair: Pair, ticket: int) -> None:
        """The attempt `begin` gave `ticket` served its request: its workers work, so a failure
        before it neither keeps them out of rotation nor lengthens their next backoff. An attempt
        begun before a worker's last failure says nothing about it since (a long stream that began
        before its KV streams stalled) and is ignored."""
        with self._lock:
            pair.decode.pull_faults.clear()
            for w in (pair.decode, pair.prefill):
                if w is not None and ticket >= w.failed_ticket:
                    w.failures, w.backoff_until = 0, 0.0

    def _rested(self, workers: list[WorkerInfo]) -> list[WorkerInfo]:
        """These workers less those backing off after a failed request, unless every one of them is:
        then all of them.

        A backoff never takes the last workers that could serve a request out (as Envoy's panic
        threshold; its max_ejection_percent still ejects a pool's only host): it is there to steer
        requests to the others, and with none left it could only refuse them for up to
        `backoff_max` and make the router unready. An attempt on a worker that failed a moment ago
        beats a sure refusal: the fault may have passed, or been blamed on the wrong worker (the
        router tells a prefill worker's failure from its decode partner's by the message), and a
        fault that every worker hit would push them all out in turn. A worker that keeps failing
        costs its requests what it did before backoffs existed, no more.

        Callers pass the workers that could serve the request at all (`_able`: its role, a prompt
        their KV holds, a partner whose KV layout fits): during a rolling upgrade the only decode
        workers whose KV an old prefill worker fits are the old ones, and a new one in rotation does
        not make them spare. A worker that is only busy (it refused this request, or its KV cache is
        full) is filtered out after this, and keeps those backing off out: it is not gone, and a
        request it cannot take now is one to retry later, not one to send to a worker that just
        failed."""
        now = self.clock()
        rested = [w for w in workers if w.backoff_until <= now]
        return rested or workers

    def _able(
        self, prompt_tokens: int, controls: frozenset[str] = frozenset()
    ) -> tuple[list[WorkerInfo], list[WorkerInfo]]:
        """The eligible decode (or colocated) and prefill workers that could serve a prompt of this
        size with these sampling controls, KV room now aside: a prefill worker that holds it; a
        decode worker whose whole cache does and that is colocated or takes such a prefill
        worker's KV."""
        decodes, prefills = self._targets()
        prefills = [
            w
            for w in prefills
            if w.eligible and w.role == "prefill" and _holds(w, prompt_tokens) and _applies(w, controls)
        ]
        decodes = [
            w
            for w in decodes
            if w.eligible
            and w.role in DECODE_ROLES
            and _capacity(w) > prompt_tokens
            and _applies(w, controls)
            and (w.role == "colocated" or any(_kv_compatible(p, w) for p in prefills))
        ]
        return decodes, prefills

    def missing_controls(self, prompt_tokens: int, controls: frozenset[str]) -> bool:
        """Workers could serve the prompt, but none with these sampling controls (a rolling upgrade
        under way, or workers of an older build)."""
        return (
            bool(controls)
            and bool(self._able(prompt_tokens)[0])
            and not self._able(prompt_tokens, controls)[0]
        )

    def all_full(self, prompt_tokens: int, exclude: set[str], controls: frozenset[str] = frozenset()) -> bool:
        """Healthy decode workers exist but none has KV room for the prompt right now: the caller
        should retry later (RESOURCE_EXHAUSTED), unlike when no worker is healthy (UNAVAILABLE)."""
        decodes, _ = self._able(prompt_tokens, controls)
        eligible = [w for w in self._rested(decodes) if w.address not in exclude]
        return bool(eligible) and all(w.free_tokens() <= prompt_tokens for w in eligible)

    def pick(
        self, prompt_tokens: int, exclude: set[str], adapter: str = "", controls: frozenset[str] = frozenset()
    ) -> Pair | None:
        """A decode worker with KV room for the prompt and a prefill worker with the least queued
        prompt tokens; colocated workers need no prefill partner.

        With a LoRA adapter, workers that hold it in device memory come first, then those holding
        it in host memory, then the rest (where it loads on first use); among equals, the decode
        worker with the most free KV and the least loaded prefill worker win.
        """
        # By the role each reports: a prefill worker listed among the decode targets (a wrong
        # Service selector) reports the most free KV and would be picked to decode, then refuse.
        decodes, prefills = self._able(prompt_tokens, controls)
        roomy = [
            w for w in self._rested(decodes) if w.address not in exclude and w.free_tokens() > prompt_tokens
        ]
        roomy.sort(key=lambda w: (_residency(w, adapter), w.free_tokens(), -w.pending_requests), reverse=True)
        for decode in roomy:
            if decode.role == "colocated":
                return Pair(decode, None)
            # Only a prefill worker whose KV the decode worker takes (same weights and layout):
            # during a rolling upgrade an incompatible one sits idle, so the shortest queue is its.
            fits = [
                w
                for w in self._rested([w for w in prefills if _kv_compatible(w, decode)])
                if w.address not in exclude
            ]
            if fits:
                prefill = min(
                    fits,
                    key=lambda w: (
                        -_residency(w, adapter),
                        w.stats.queued_prompt_tokens + w.pending_tokens,
                        w.pending_requests,
                    ),
                )
                return Pair(decode, prefill)
        return None

    def serving_problem(self, *, as_checked: bool = False) -> str | None:
        """Why no request could be served now whatever its size (no eligible colocated worker, nor
        an eligible decode worker with a prefill worker whose KV it takes); None when one could.
        KV room is ignored: full workers are busy, not gone. Names no worker address (callers
        pass it on to clients). A backoff changes nothing here: `pick` falls back on the workers
        backing off when they alone could serve a request (`_rested`). `as_checked`: by what the
        workers' last health checks said, not counting a request failed on one since
        (`mark_failed`)."""
        decodes, prefills = self._targets()
        serving = [w for w in decodes if _serving(w, as_checked)]
        if any(w.role == "colocated" for w in serving):
            return None
        if not any(w.role == "decode" for w in serving):
            return f"no decode or colocated worker is serving ({len(decodes)} known)"
        if not any(w.role == "prefill" for w in prefills if _serving(w, as_checked)):
            return f"no prefill worker is serving ({len(prefills)} known)"
        return self.pairing_problem(as_checked=as_checked)

    def pairing_problem(self, *, as_checked: bool = False) -> str | None:
        """Why no pair forms although decode and prefill workers are eligible (their KV differs:
        other weights or block size, as in a rolling upgrade gone wrong); None otherwise."""
        decodes, prefills = self._targets()
        decodes = [w for w in decodes if _serving(w, as_checked) and w.role == "decode"]
        prefills = [w for w in prefills if _serving(w, as_checked) and w.role == "prefill"]
        if not decodes or not prefills or any(_kv_compatible(p, d) for p in prefills for d in decodes):
            return None

        def kinds(ws: list[WorkerInfo]) -> str:
            return ", ".join(sorted({f"{w.stats.model_id} (block size {w.stats.block_size})" for w in ws}))

        return (
            f"no prefill worker's KV fits a decode worker's: decode workers serve {kinds(decodes)}, "
            f"prefill workers {kinds(prefills)}"
        )

    def adapters(self) -> list[str]:
        """Adapters resident (device or host memory) on any eligible worker."""
        names: set[str] = set()
        for w in self.snapshot():
            if w.eligible:
                names.update(w.stats.adapters_device)
                names.update(w.stats.adapters_host)
        return sorted(names)

    def kv_capacity_tokens(self) -> int | None:
        """The longest prompt whose KV some eligible worker pair holds: a colocated worker's whole
        cache, or the smaller of a decode and a prefill worker's (both hold the prompt's KV); None
        while no such worker has reported its stats."""
        decodes, prefills = self._targets()
        prefill_sizes = [_capacity(w) for w in prefills if w.eligible and w.role == "prefill"]
        sizes = [
            _capacity(w) if w.role == "colocated" else min(_capacity(w), max(prefill_sizes, default=0))
            for w in decodes
            if w.eligible
        ]
        if not sizes or (max(sizes) == 0 and not prefill_sizes):
            return None  # decode workers but no prefill worker has reported yet
        return max(sizes)

    def begin(self, pair: Pair, prompt_tokens: int) -> int:
        """Count an attempt's prompt against its pair until `end(pair, ticket)`; returns the ticket."""
        with self._lock:
            ticket = self._next_ticket
            self._next_ticket += 1
            for w in (pair.decode, pair.prefill):
                if w is not None:
                    w.pending[ticket] = prompt_tokens
                    w.pending_requests += 1
        return ticket

    def end(self, pair: Pair, ticket: int) -> None:
        with self._lock:
            for w in (pair.decode, pair.prefill):
                if w is not None:
                    w.pending.pop(ticket, None)
                    w.pending_requests = max(0, w.pending_requests - 1)
                    w.ended_at = time.monotonic()
