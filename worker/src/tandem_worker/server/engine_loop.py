"""`EngineLoop`: one thread owns the `LLMEngine`; server threads talk to it through commands.

Parts:
- `submit()` validates in the caller's thread (so a bad request fails at once with
  `RequestError`) and returns a `RequestStream` that yields the request's events;
- `abort()` cancels a request wherever it is, freeing its KV blocks;
- `kv_ready()` tells a decode engine that a request's prompt KV has been written into its
  reserved blocks, with the first token the prefill worker sampled;
- the loop thread applies commands between steps and steps while there is work.
The queue is bounded: beyond `max_pending` unfinished requests, `submit()` raises `QueueFull`; on a
prefill worker, so does a prompt that would take its unfinished prompts past
`max_queued_prefill_tokens` (when set, and unless it would be the only one).
On a prefill worker each request's KV pieces wait in its stream for the reader that sends them
(`KVBacklog`): past `EngineConfig.kv_send_backlog_bytes` unsent, its next prompt chunk is held
back until the reader catches up, which wakes the loop. Its reader may ask for a `Heartbeat` while
it waits (`RequestStream.events`): proof for the decode worker that the engine is busy, not stuck.
An `EngineWatchdog` tells a stuck engine (a kernel or collective that never returns, a deadlock:
one step, or one batch of commands, that has had no progress for a long while) from an idle one
(nothing to do), which the loop thread itself cannot: it is the one that is stuck.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..engine.llm_engine import LLMEngine, PrefillResult, RequestOutput
from ..engine.sampling_params import RequestError, SamplingParams

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests than the worker accepts at once; the caller should retry elsewhere or later."""


class RequestAborted(Exception):
    pass


class EngineDead(RuntimeError):
    """The engine thread has failed (for example, out of device memory): this worker serves
    nothing more and should be restarted; a router may retry the request elsewhere."""


@dataclass(frozen=True)
class KVReserved:
    """Decode side: blocks are reserved; pull KV for tokens [skip_tokens, prompt_len) into them."""

    request_id: str
    skip_tokens: int
    block_table: list[int]


@dataclass(frozen=True)
class KVPiece:
    """Prefill side: one layer's KV for tokens [start, start + n) of the prompt, fresh host tensors.
    Call `ready.synchronize()` (when not None) before reading them: on CUDA they are pinned
    buffers a side stream is still filling when the piece is queued."""

    layer: int
    start: int
    key: Any  # torch.Tensor [n, kv_heads, head_dim]
    value: Any
    ready: Any = None  # None, or a torch.cuda.Event (anything with .synchronize())

    @property
    def nbytes(self) -> int:
        """What the piece holds, key and value: what the KV backlog and the transfer metrics count."""
        return self.key.nbytes + self.value.nbytes


@dataclass(frozen=True)
class Heartbeat:
    """No event for the heartbeat period, but the engine made progress meanwhile (`EngineLoop.progress`):
    the request waits its turn behind others, and the engine is not stuck."""


@dataclass(frozen=True)
class _Busy:
    """What the loop thread is in: "step" (one with work to do) or "commands"; since `clock()` at
    its start or at the last progress within it (a layer's KV)."""

    what: str
    since: float


@dataclass(frozen=True)
class Stall:
    """The engine loop has been in one step (or batch of commands) for `seconds` with no progress."""

    doing: str  # "a step with 3 requests (1 prefilling, 2 decoding)"
    seconds: float

    def __str__(self) -> str:
        return f"{self.doing}, no progress for {self.seconds:.1f} s"


_END = object()


def _noop() -> None:
    pass


class KVBacklog:
    """One prefill request's KV pieces queued for its reader and not yet sent, in bytes (also
    summed over the loop's requests, `EngineLoop.kv_unsent_bytes`).

    The sink (engine thread) counts a piece in as it queues it and never waits; the reader (a gRPC
    thread) counts it out once sent. The scheduler asks `over_limit()` before each of the request's
    prompt chunks and holds the chunk back while it is True; the reader wakes the engine loop when
    the backlog falls back to the limit, as the loop may be blocked for want of work."""

    def __init__(self, loop: EngineLoop, limit: int) -> None:
        self._loop = loop
        self.limit = limit
        self.bytes = 0
        self._held = False  # the scheduler saw it over the limit: wake the loop when it is not
        self._closed = False  # the reader is gone: what the engine still computes is dropped

    def put(self, stream: RequestStream, piece: KVPiece) -> None:
        """Engine thread: queue a piece for the reader, unless it stopped reading."""
        n = piece.nbytes
        # A layer computed: progress within a step, which may be long (a big chunk on a CPU).
        self._loop._progressed()
        with self._loop._lock:
            if self._closed:
                return
            self.bytes += n
            self._loop._kv_unsent += n
        stream.put(piece)

    def over_limit(self) -> bool:
        """Engine thread (the scheduler): hold back the request's next chunk."""
        with self._loop._lock:
            self._held = self.bytes > self.limit
            return self._held

    def sent(self, n: int) -> None:
        """Reader thread: a piece of `n` bytes has been sent."""
        with self._loop._lock:
            self.bytes -= n
            self._loop._kv_unsent -= n
            wake = self._held and self.bytes <= self.limit
            if wake:
                self._held = False
        if wake:
            self._loop.wake()

    def close(self) -> None:
        """Reader thread: it reads no more (the request ended, failed or was cancelled)."""
        with self._loop._lock:
            if not self._closed:
                self._closed = True
                self._loop._kv_unsent -= self.bytes
                self.bytes = 0


class RequestStream:
    """The events of one request, in order: `KVReserved`, `KVPiece`s, `RequestOutput`s.

    With `kv` (a prefill request), a `KVPiece` counts as sent once the consumer asks for the next
    event: the KVTransfer servicer asks only after gRPC took all of the piece's messages."""

    def __init__(
        self, loop: EngineLoop, request_id: str, kv: KVBacklog | None = None, prefill_tokens: int = 0
    ) -> None:
        self.loop = loop
        self.request_id = request_id
        self.kv = kv
        self.prefill_tokens = prefill_tokens  # what it adds to `EngineLoop.queued_prefill_tokens`
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.finished = False

    def put(self, item: Any) -> None:
        self._q.put(item)

    def __iter__(self) -> Iterator[Any]:
        return self.events()

    def events(self, heartbeat_s: float | None = None) -> Iterator[Any]:
        """The events, in order. With `heartbeat_s`, also a `Heartbeat` after each `heartbeat_s`
        without an event in which the engine made progress (`EngineLoop.progress` moved since the
        last item): a stuck engine (a kernel that never returns) gives none, so a reader that
        times out on silence still sees that."""
        seen = self.loop.progress
        try:
            while True:
                try:
                    item = self._q.get(timeout=heartbeat_s)
                except queue.Empty:
                    now = self.loop.progress
                    if now != seen:
                        seen = now
                        yield Heartbeat()
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if self.kv is not None and isinstance(item, KVPiece):
                    self.kv.sent(item.nbytes)
                if isinstance(item, RequestOutput) and item.finished:
                    return
                seen = self.loop.progress  # the next heartbeat needs progress after this item
        finally:
            self.close_kv()

    def close_kv(self) -> None:
        """The consumer reads no more: its unsent pieces stop counting (idempotent)."""
        if self.kv is not None:
            self.kv.close()

    def cancel(self) -> None:
        self.loop.abort(self.request_id)


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        max_pending: int = 1024,
        max_queued_prefill_tokens: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`max_queued_prefill_tokens` (0: no bound): a prefill worker refuses a KV pull as busy
        (`QueueFull`) when its prompt would take the prompt tokens of its unfinished pulls past it:
        about the tokens it prefills within the wait a request may have in its queue (its prefill
        throughput times a TTFT target). Heartbeats keep a queued pull alive for as long as the
        engine works, while it holds blocks reserved on its decode worker and its client waits; the
        router picks the least queued prefill worker by stats that lag, and passes the refusal on to
        another one (or answers 429 when all are this busy).

        `clock` times stalls (`stall`); tests pass one they move by hand."""
        self.engine = engine
        self.max_pending = max_pending
        self.max_queued_prefill_tokens = max_queued_prefill_tokens
        self._cmds: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.error: BaseException | None = None
        self.died = threading.Event()  # set once `error` is, for whoever must react (the server)
        self._stats: dict[str, Any] = engine.stats()
        self._kv_unsent = 0  # bytes, over every request's KVBacklog (under _lock)
        self._prefill_tokens = 0  # over the unfinished prefill-worker requests (under _lock)
        # Steps that did something, KV pieces computed, and steps that waited on an adapter still
        # being read: it stands still only while the engine is stuck or has nothing it can do (see
        # `RequestStream.events`). Written by the loop thread alone (KVBacklog.put runs on it too),
        # read by any.
        self.progress = 0
        self._clock = clock
        # Set by the loop thread alone, replaced whole (never mutated), so any thread reads one
        # consistent value: None while it waits for commands or steps with nothing to do.
        self._busy: _Busy | None = None

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._cmds.put(lambda: None)
        self._thread.join(timeout=10)

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    @property
    def queued_prefill_tokens(self) -> int:
        """Prefill side: prompt tokens (less those the reader has) of the unfinished KV pulls, from
        their submission on. Whole prompts, also once partly computed: exact under the lock at
        submission, where the engine's `queued_prompt_tokens` lags by the commands not yet run."""
        with self._lock:
            return self._prefill_tokens

    @property
    def kv_unsent_bytes(self) -> int:
        """Prefill side: KV queued for every request's reader and not yet sent."""
        with self._lock:
            return self._kv_unsent

    def wake(self) -> None:
        """Make a loop blocked for want of work step again (a held-back request may go on)."""
        self._cmds.put(_noop)

    # --- called from server threads -----------------------------------------------------------

    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        remote_kv: bool = False,
        kv_sink: bool = False,
        kv_skip: int = 0,
        adapter: str = "",
    ) -> RequestStream:
        self._check_alive()
        self.engine.validate(prompt_token_ids, params)
        if adapter:
            self.engine.lora.check(adapter)  # NOT_FOUND before anything is queued
        backlog = KVBacklog(self, self.engine.config.kv_send_backlog_bytes) if kv_sink else None
        tokens = max(len(prompt_token_ids) - kv_skip, 1) if kv_sink else 0
        stream = RequestStream(self, request_id, backlog, tokens)
        with self._lock:
            # Under the lock the dying thread takes to fail every stream: a stream registered
            # after that would wait for events forever.
            self._check_alive()
            if len(self._streams) >= self.max_pending:
                raise QueueFull(f"{len(self._streams)} requests in flight (the limit is {self.max_pending})")
            if request_id in self._streams:
                raise RequestError("request_id", f"{request_id!r} is already in flight")
            most, queued = self.max_queued_prefill_tokens, self._prefill_tokens
            # An idle worker takes any prompt, however long: refused, it would be refused everywhere.
            if tokens and most and queued and queued + tokens > most:
                raise QueueFull(
                    f"{queued} prompt tokens queued for prefill; {tokens} more would pass the limit of {most}"
                )
            self._prefill_tokens += tokens
            self._streams[request_id] = stream

        def add() -> None:
            sink = None
            if backlog is not None:
                # Never waits for the reader (the sink runs inside a step every request shares):
                # the scheduler bounds the backlog by holding back this request's next chunk.
                sink = lambda layer, start, k, v, ready: backlog.put(  # noqa: E731
                    stream, KVPiece(layer, start, k, v, ready)
                )
            try:
                self.engine.add_request(
                    prompt_token_ids=prompt_token_ids,
                    params=params,
                    request_id=request_id,
                    remote_kv=remote_kv,
                    kv_sink=sink,
                    kv_skip=kv_skip,
                    kv_backlogged=backlog.over_limit if backlog is not None else None,
                    adapter=adapter or None,
                )
            except Exception as e:  # validated already; anything here is a race such as a duplicate id
                self._close(request_id, e)

        self._cmds.put(add)
        return stream

    def abort(self, request_id: str) -> None:
        def do() -> None:
            self.engine.abort(request_id)
            self._close(request_id, RequestAborted(request_id))

        self._cmds.put(do)

    def kv_ready(self, request_id: str, first: PrefillResult) -> None:
        def do() -> None:
            out = self.engine.kv_ready(request_id, first)
            # Before the output goes out, as after a step: a request that ends here (max_tokens 1)
            # has freed its blocks, and a router that asks for stats on its last message must
            # see them free.
            self._stats = self.engine.stats()
            if out is not None:
                self._route([out])

        self._cmds.put(do)

    def stats(self) -> dict[str, Any]:
        """The engine's stats as of its last command batch or step. Answered at once, also while a
        long step (a big prefill) runs, so health checks and scrapes never wait for the engine."""
        return self._stats

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run `fn` on the loop thread between steps and return its result (for stats)."""
        box: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def do() -> None:
            try:
                box.put((True, fn()))
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                box.put((False, e))

        self._check_alive()
        self._cmds.put(do)
        deadline = time.monotonic() + timeout
        while True:
            try:
                ok, value = box.get(timeout=min(0.1, max(deadline - time.monotonic(), 0.001)))
                break
            except queue.Empty:
                self._check_alive()  # a dead loop never runs the command: say so, not time out
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the engine did not answer within {timeout:g} s") from None
        if not ok:
            raise value
        return value

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDead(f"engine failed: {self.error!r}")

    def stall(self, timeout: float) -> Stall | None:
        """Any thread: a Stall when the loop thread has been in one step with work to do, or in one
        batch of commands, for at least `timeout` seconds with no progress meanwhile; else None.

        An idle loop (waiting for commands, or stepping with nothing schedulable: requests whose KV
        is in transit, or held back for a slow reader) is never stalled however long it waits: its
        steps return at once, and what it waits for has timeouts of its own."""
        busy = self._busy
        if busy is None:
            return None
        waited = self._clock() - busy.since
        if waited < timeout:
            return None
        return Stall(self._describe(busy.what), waited)

    def _describe(self, what: str) -> str:
        """What the stalled loop is doing, read from another thread: the loop thread is not moving
        the queues (it is stalled), but a late one may, and a description is not worth failing for."""
        if what != "step":
            return f"{what} between steps, {len(self._streams)} requests in flight"
        s = self.engine.scheduler
        try:
            running = list(s.running)
            waiting, awaiting, reserved = len(s.waiting), len(s.awaiting), len(s.reserved)
        except RuntimeError:  # changed size while read: it moved after all
            return "a step"
        prefilling = sum(1 for q in running if q.num_computed_tokens < q.num_prompt_tokens)
        parts = [
            f"{n} {label}"
            for n, label in (
                (prefilling, "prefilling"),
                (len(running) - prefilling, "decoding"),
                (waiting, "waiting"),
                (awaiting, "awaiting blocks for remote KV"),
                (reserved, "receiving KV"),
            )
            if n
        ]
        total = len(running) + waiting + awaiting + reserved
        return f"a step with {total} request{'' if total == 1 else 's'} ({', '.join(parts)})"

    def thread_stack(self) -> str:
        """Where the loop thread is now (its Python stack): the call that does not return."""
        frame = sys._current_frames().get(self._thread.ident or -1)
        return "".join(traceback.format_stack(frame)) if frame is not None else "(not running)\n"

    def _progressed(self) -> None:
        """Loop thread: progress (a step that did something, a layer's KV within one)."""
        self.progress += 1
        if self._busy is not None:
            self._busy = _Busy(self._busy.what, self._clock())

    # --- the loop thread -----------------------------------------------------------------------

    def _forget(self, request_id: str) -> RequestStream | None:
        """Under _lock: the request is over (finished, failed, aborted); its stream, if still known."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._prefill_tokens -= stream.prefill_tokens
        return stream

    def _close(self, request_id: str, error: BaseException | None = None) -> None:
        with self._lock:
            stream = self._forget(request_id)
        if stream is not None:
            stream.put(error if error is not None else _END)

    def _route(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                # Forgotten before its reader sees the end: a pull that follows finds it gone.
                stream = self._forget(out.request_id) if out.finished else self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._cmds.get(timeout=0.05) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        # A command can hang too (an adapter copied to the device); loading a big adapter from a
        # slow disk takes a while, but far less than any stall timeout.
        self._busy = _Busy("commands", self._clock())
        try:
            cmd()
            while True:
                try:
                    self._cmds.get_nowait()()
                except queue.Empty:
                    return
        finally:
            self._busy = None

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                # Block (briefly) on the command queue when a step can do nothing: spinning on
                # empty steps took a core and the GIL from the gRPC threads writing the very KV
                # that waiting requests need; a command (submit, abort, kv_ready) wakes it at once.
                idle = engine.last_step_idle or not engine.has_schedulable_work()
                self._drain_commands(block=idle)
                if self._stop.is_set():
                    break
                self._stats = engine.stats()
                # Watched only with work to do: a step with nothing schedulable returns at once,
                # and an idle worker is alive however long it waits.
                if engine.has_schedulable_work():
                    self._busy = _Busy("step", self._clock())
                outputs = engine.step()
                # A request waiting for its adapter's read (from a slow disk, longer than a decode
                # worker's idle timeout) is busy, not stalled. A read that hangs is bounded by the
                # adapter load timeout instead: past it the request fails with the reason, and
                # until then a hung read cannot be told from a slow one (the read reports nothing).
                if not engine.last_step_idle or engine.last_step_waited_on_load:
                    self._progressed()
                self._busy = None
                self._stats = engine.stats()
                for r in engine.take_reservations():
                    with self._lock:
                        stream = self._streams.get(r.request_id)
                    if stream is not None:
                        stream.put(KVReserved(r.request_id, r.skip_tokens, r.block_table))
                self._route(outputs)
        except BaseException as e:  # noqa: BLE001 - fail every waiting request, then report
            log.exception("engine loop failed")
            self._busy = None  # failed, not stalled: `died` tells
            with self._lock:
                self.error = e
                streams = list(self._streams.values())
                self._streams.clear()
                self._prefill_tokens = 0
            for s in streams:
                s.put(EngineDead(f"engine failed: {e!r}"))
            self.died.set()


# How long the engine loop may spend in one step with work (or one batch of commands) with no
# progress before the worker calls its engine stuck (seconds; `tandem worker --engine-stall-timeout`).
# Legitimate steps are far shorter, the slowest being the first of their kind: a request's first
# prefill compiles its Triton kernels (tens of seconds with a cold cache), a LoRA decode graph not
# captured at startup is captured in a step, and a long prompt chunk on a CPU takes seconds. A
# false alarm costs a restart (minutes of model loading, and a cold cache could make the next first
# step as slow again), while a stuck worker's requests fail by their own timeouts meanwhile (the
# decode side's KV idle timeout, 30 s): so a long margin over the slowest step.
ENGINE_STALL_TIMEOUT_S = 120.0


class EngineWatchdog:
    """Watches an `EngineLoop` from a thread of its own, every `period` seconds (default: a
    quarter of `timeout`, at most 1 s). When the loop has been stalled for `timeout` seconds
    (`EngineLoop.stall`) it logs one error naming what the loop was doing, for how long, and the
    loop thread's stack, then calls `on_change(stall)`; once the loop moves again, `on_change(None)`.

    It reports, and never kills: a thread stuck in a device call cannot be stopped, and the process
    may not even exit cleanly around it (its CUDA context waits for the kernel); the worker's
    liveness probe failing makes the kubelet restart the pod, which always works."""

    def __init__(
        self,
        loop: EngineLoop,
        timeout: float,
        on_change: Callable[[Stall | None], None],
        period: float | None = None,
    ) -> None:
        if not timeout > 0:  # also NaN
            raise ValueError(
                f"the engine stall timeout must be a positive number of seconds, got {timeout!r}"
            )
        self.loop = loop
        self.timeout = timeout
        self.on_change = on_change
        self.period = period if period is not None else min(max(timeout / 4, 0.01), 1.0)
        self.stalled: Stall | None = None
        self._stalled_since = 0.0  # loop clock, when the current stall began
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-watchdog", daemon=True)

    def start(self) -> EngineWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check(self) -> Stall | None:
        """One look at the loop (the thread's): its stall, or None; reports a change."""
        stall = self.loop.stall(self.timeout)
        was = self.stalled
        self.stalled = stall
        if stall is not None and was is None:
            self._stalled_since = self.loop._clock() - stall.seconds
            log.error(
                "engine stuck: %s (the stall timeout is %g s); this worker reports NOT_SERVING and "
                "fails its liveness check until the engine moves again. The engine thread is at:\n%s",
                stall,
                self.timeout,
                self.loop.thread_stack(),
            )
            self.on_change(stall)
        elif stall is None and was is not None:
            log.warning(
                "engine moving again after %.0f s stuck (%s); serving again",
                self.loop._clock() - self._stalled_since,
                was.doing,
            )
            self.on_change(None)
        return stall

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a watchdog that dies watches nothing; say why, go on
                log.exception("engine watchdog check failed")
