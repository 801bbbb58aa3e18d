"""The worker process's gRPC services: `Worker` (decode, colocated), `KVTransfer` (prefill), `Admin`.

A decode worker serving a request with a `prefill_endpoint`:
1. submits it to its engine as remote-KV; the engine reserves blocks for the whole prompt first
   (admission control lives where KV memory is scarce), reusing its own prefix cache;
2. calls the prefill worker's `KVTransfer.Prefill` with its KV layout; the prefill worker refuses
   a mismatch with FAILED_PRECONDITION, else streams each layer's KV as the layer finishes, after
   the digest of the request's LoRA adapter as it computed with it (`KVChunk.adapter_digest`): the
   two workers read adapters from their own stores, and re-read one whose files changed, so the
   same name may stand for two versions; KV of another version than the decode worker's is
   refused with FAILED_PRECONDITION ("incompatible KV layout", which the router retries on another
   pair) before any of it is written;
3. writes each chunk straight into the reserved blocks (the only copy on this side; on a GPU via a
   pinned staging buffer and a side stream, all of it waited for before step 4);
4. on the last message hands the first token to the engine, which joins the running batch.
Any failure before the first token frees the reserved blocks and ends the call with a status the
router may retry on another pair (UNAVAILABLE); nothing has been streamed to the client yet. A pull
that receives nothing for the decode worker's idle timeout (a stalled prefill worker) is such a
failure; a prefill worker whose engine is busy with other prompts sends a pull that waits its turn
an empty message every `kv_heartbeat()` of the timeout the pull names (see KV_HEARTBEAT_S), so only
a stuck engine runs into it. A prefill worker whose readers already leave more KV unsent than
`kv_send_backlog_total_bytes` refuses new pulls as busy (RESOURCE_EXHAUSTED), which the decode
worker passes on: the router tries another pair.
Both sides count each pull once it ends, as completed or aborted (`metrics.kv_transfer_ended`); a
pull refused before any KV moved is an aborted one on both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator

import grpc

from ..engine.llm_engine import LLMEngine, PrefillResult, RequestOutput
from ..engine.lora import AdapterBusyError, AdapterError, AdapterNotFoundError, short_digest
from ..engine.sampling_params import SAMPLING_CONTROLS, RequestError
from . import metrics
from .convert import (
    FINISH_TO_PB,
    kv_layout,
    params_from_pb,
    params_to_pb,
    prompt_logprobs_from_pb,
    prompt_logprobs_to_pb,
    top_logprobs_from_pb,
    top_logprobs_to_pb,
)
from .engine_loop import (
    EngineDead,
    EngineLoop,
    Heartbeat,
    KVPiece,
    KVReserved,
    QueueFull,
    RequestAborted,
    Stall,
)
from .health import DRAINING
from .kv_transfer import KVWriter, adapter_mismatch, encode_kv_chunk, kv_chunks, layout_mismatch, prefill_stub
from .pb import inference_pb2 as pb
from .pb import worker_pb2 as wpb
from .pb import worker_pb2_grpc as wgrpc
from .worker_pool import RECONNECT_OPTIONS

log = logging.getLogger(__name__)
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 2**20),
    ("grpc.max_receive_message_length", 64 * 2**20),
    # KV streams are bulk transfers: bigger HTTP/2 frames and windows than RPC-sized defaults.
    ("grpc.http2.max_frame_size", 16 * 2**20 - 1),
    ("grpc.http2.lookahead_bytes", 8 * 2**20),
]


IDLE_CHANNEL_SECONDS = 1800.0

# A decode worker gives up on a KV pull that receives nothing for this long (seconds;
# $TANDEM_KV_IDLE_TIMEOUT_S overrides it, `tandem worker --kv-idle-timeout` both): a prefill worker
# that is alive (it answers keepalive pings) but stalled would hold the reserved blocks for as long
# as the client has no deadline. Counted from the call's start too (a prefill worker that never
# answers). Silence is not idleness: a request queued behind other prompts, or behind a long chunk
# on a slow machine, has nothing to send for a while; see KV_HEARTBEAT_S.
KV_IDLE_TIMEOUT_ENV = "TANDEM_KV_IDLE_TIMEOUT_S"
KV_IDLE_TIMEOUT_S = 30.0

# A prefill worker sends a pull with nothing to send an empty message (the handshake, if not sent
# yet) after this long (seconds), but only if its engine made progress meanwhile (a step, a layer's
# KV): a busy engine keeps its queued pulls alive, a stuck one (a kernel that never returns) lets
# them time out. Each pull names the decode worker's timeout (PrefillRequest.kv_idle_timeout_s) and
# the beat follows it down (`kv_heartbeat`), whatever the prefill worker's own timeout is; beats stop
# for longer than the timeout only when no progress is seen for that long: no step ends and no layer
# finishes (a single layer of one chunk slower than the timeout), or every running prompt waits for
# its own slow reader while the queued ones wait for their blocks.
KV_HEARTBEAT_S = 5.0
# The fastest beat a pull's timeout can ask for: a peer's tiny value must not make this worker's
# gRPC threads spin.
KV_HEARTBEAT_MIN_S = 0.05


def kv_idle_timeout(seconds: float | None = None) -> float:
    """`seconds` (the --kv-idle-timeout flag) when given, else $TANDEM_KV_IDLE_TIMEOUT_S, else
    KV_IDLE_TIMEOUT_S."""
    if seconds is not None:
        if not seconds > 0:  # also NaN
            raise ValueError(f"the KV idle timeout must be a positive number of seconds, got {seconds!r}")
        return seconds
    raw = os.environ.get(KV_IDLE_TIMEOUT_ENV, "")
    if not raw:
        return KV_IDLE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:  # also NaN
        raise ValueError(f"{KV_IDLE_TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def kv_heartbeat(idle_timeout: float) -> float:
    """The prefill side's heartbeat period for a decode side's `idle_timeout`: KV_HEARTBEAT_S, or less
    so that a beat skipped for want of progress still leaves room for the next before the timeout."""
    return max(min(KV_HEARTBEAT_S, idle_timeout / 4), KV_HEARTBEAT_MIN_S)


class _Watched:
    """One KV pull under a `StallWatch`: `touch()` on every message received."""

    def __init__(self, call: grpc.Call) -> None:
        self.call = call
        self.last = time.monotonic()
        self.stalled = False

    def touch(self) -> None:
        self.last = time.monotonic()


class StallWatch:
    """Cancels the KV pulls that received nothing for `idle_timeout` seconds (their iteration then
    raises CANCELLED, and `stalled` says why). One thread for all of a worker's pulls, alive only
    while some pull is watched: a timer per pull would start a thread per request."""

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self._period = min(1.0, idle_timeout / 4)
        self._watched: set[_Watched] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self, call: grpc.Call) -> Iterator[_Watched]:
        w = _Watched(call)
        with self._lock:
            self._watched.add(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kv-stall-watch", daemon=True)
                self._thread.start()
        try:
            yield w
        finally:
            with self._lock:
                self._watched.discard(w)

    def _run(self) -> None:
        while True:
            time.sleep(self._period)
            now = time.monotonic()
            with self._lock:
                if not self._watched:
                    self._thread = None  # the next watched pull starts another
                    return
                stalled = [w for w in self._watched if now - w.last >= self.idle_timeout]
            for w in stalled:
                w.stalled = True
                w.call.cancel()


class WorkerState:
    """What every service of one worker process shares."""

    def __init__(
        self,
        engine: LLMEngine,
        loop: EngineLoop,
        role: str,
        model_id: str,
        kv_idle_timeout_s: float | None = None,
    ) -> None:
        """`kv_idle_timeout_s`: see KV_IDLE_TIMEOUT_S (default: `kv_idle_timeout()`). A decode worker
        gives up on its pulls after it; a prefill worker beats for it only for pulls that name none."""
        self.engine = engine
        self.loop = loop
        self.role = role
        self.model_id = model_id
        self.layout = kv_layout(engine, model_id)
        self.draining = threading.Event()
        # Set by the engine watchdog while the engine is stuck (worker_main): new requests are
        # refused with UNAVAILABLE, which the router retries elsewhere, rather than queued behind
        # a step that may never end until they time out.
        self.engine_stall: Stall | None = None
        self.stall_watch = StallWatch(kv_idle_timeout(kv_idle_timeout_s))
        self.kv_heartbeat_s = kv_heartbeat(self.stall_watch.idle_timeout)
        # Per prefill endpoint: its channel and when it was last used.
        self._channels: dict[str, tuple[grpc.Channel, float]] = {}
        self._lock = threading.Lock()

    def prefill_call(self, endpoint: str):
        now = time.monotonic()
        with self._lock:
            ch = self._channels.get(endpoint, (None, 0.0))[0]
            if ch is None:
                ch = grpc.insecure_channel(endpoint, options=GRPC_OPTIONS + RECONNECT_OPTIONS)
                # Prefill pods come and go (autoscaling, rollouts), each at a new address: close
                # the channels of endpoints unused for a long while (far longer than any prefill).
                for old, (c, used) in list(self._channels.items()):
                    if now - used > IDLE_CHANNEL_SECONDS:
                        del self._channels[old]
                        c.close()
            self._channels[endpoint] = (ch, now)
        return prefill_stub(ch)


# What ends a request's event stream with a status for the caller: the engine died, or the engine
# thread refused the request when it added it (its adapter, in memory only there, leaves no room for
# its KV; the adapter was unloaded meanwhile). AdapterNotFoundError is a RequestError.
_STREAM_ABORTS = (EngineDead, RequestError, AdapterError)


def _abort_for(context: grpc.ServicerContext, e: Exception) -> None:
    if isinstance(e, AdapterNotFoundError):
        context.abort(grpc.StatusCode.NOT_FOUND, str(e))
    if isinstance(e, (RequestError, AdapterError)):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, QueueFull):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    if isinstance(e, EngineDead):
        # UNAVAILABLE: the router retries elsewhere (when nothing was streamed) and takes this
        # worker out of rotation; the process exits and is restarted (worker_main).
        context.abort(grpc.StatusCode.UNAVAILABLE, f"worker engine failed: {e}")
    raise e


def _refuse_if_stuck(s: WorkerState, context: grpc.ServicerContext) -> None:
    stall = s.engine_stall
    if stall is not None:
        context.abort(grpc.StatusCode.UNAVAILABLE, f"worker engine stuck: {stall}")


def _remaining(context: grpc.ServicerContext) -> float | None:
    r = context.time_remaining()
    return None if r is None or r > 1e8 else max(r, 0.001)


class WorkerService(wgrpc.WorkerServicer):
    def __init__(self, state: WorkerState) -> None:
        self.s = state

    def Generate(self, request: wpb.WorkerGenerateRequest, context: grpc.ServicerContext):  # noqa: N802
        s = self.s
        if s.draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
        _refuse_if_stuck(s, context)
        if s.role == "prefill":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a prefill worker does not serve Generate")
        remote = bool(request.prefill_endpoint)
        rid = request.request_id or uuid.uuid4().hex
        try:
            params = params_from_pb(request.sampling)
            stream = s.loop.submit(
                list(request.prompt_token_ids), params, rid, remote_kv=remote, adapter=request.adapter
            )
        except (RequestError, QueueFull, EngineDead) as e:
            _abort_for(context, e)
        done = threading.Event()
        guard = _CancelGuard(stream, done)
        if not context.add_callback(guard.rpc_ended):
            guard.rpc_ended()  # the RPC already ended (the caller left): no callback would come
        try:
            for ev in stream:
                if isinstance(ev, KVReserved):
                    with guard.writing_kv():
                        self._pull_kv(request, ev, context)
                    continue
                assert isinstance(ev, RequestOutput)
                if ev.error is not None:  # e.g. its adapter failed to load: nothing was generated
                    done.set()
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, ev.error)
                msg = wpb.WorkerGenerateResponse(
                    token_ids=ev.new_token_ids,
                    finish_reason=FINISH_TO_PB[ev.finish_reason],
                    num_cached_tokens=ev.num_cached_tokens,
                )
                new = len(ev.token_ids) - len(ev.new_token_ids)  # where this message's tokens start
                if ev.logprobs is not None:
                    msg.logprobs.extend(ev.logprobs[new:])
                if ev.top_logprobs is not None:
                    msg.top_logprobs.extend(top_logprobs_to_pb(t) for t in ev.top_logprobs[new:])
                if ev.prompt_logprobs is not None and new == 0 and ev.new_token_ids:
                    msg.prompt_logprobs.CopyFrom(
                        prompt_logprobs_to_pb(ev.prompt_logprobs, ev.prompt_top_logprobs)
                    )
                if ev.finished:
                    done.set()
                    m = ev.metrics
                    msg.timings.CopyFrom(
                        pb.Timings(queue_seconds=m.get("queue_time", 0.0), ttft_seconds=m.get("ttft", 0.0))
                    )
                yield msg
        except RequestAborted:
            done.set()
            return
        except _STREAM_ABORTS as e:
            done.set()
            _abort_for(context, e)
        finally:
            if not done.is_set():
                stream.cancel()

    def _pull_kv(
        self, request: wpb.WorkerGenerateRequest, ev: KVReserved, context: grpc.ServicerContext
    ) -> None:
        s = self.s
        n = len(request.prompt_token_ids)
        writer = KVWriter(
            s.engine.runner.kv_cache, ev.block_table, s.engine.config.block_size, ev.skip_tokens, n
        )
        t0 = time.monotonic()
        completed = False
        try:
            first = self._receive_kv(request, ev, context, writer)
            completed = True
        finally:  # every failure below ends in context.abort, which raises
            metrics.kv_transfer_ended("received", completed, writer.bytes, time.monotonic() - t0)
        prompt_logprobs = {}
        if first.HasField("prompt_logprobs"):
            lp, top = prompt_logprobs_from_pb(first.prompt_logprobs)
            prompt_logprobs = {"prompt_logprobs": lp, "prompt_top_logprobs": top}
        s.loop.kv_ready(
            ev.request_id,
            PrefillResult(
                token=first.first_token,
                logprob=first.first_logprob,
                top_logprobs=top_logprobs_from_pb(first.first_top_logprobs),
                cached_tokens=first.num_cached_tokens,
                **prompt_logprobs,
            ),
        )

    def _receive_kv(
        self,
        request: wpb.WorkerGenerateRequest,
        ev: KVReserved,
        context: grpc.ServicerContext,
        writer: KVWriter,
    ) -> wpb.KVChunk:
        """Pull the prompt's KV into `writer`; its last message, or abort the RPC (freeing the blocks)."""
        s = self.s
        n = len(request.prompt_token_ids)
        first = None
        watched: _Watched | None = None
        # The version this request decodes with: its adapter is pinned on the device from before its
        # blocks were reserved (KVReserved) until it ends (see LoRAManager.version).
        digest = s.engine.lora.version(request.adapter)[0] if request.adapter else ""
        try:
            call = s.prefill_call(request.prefill_endpoint)(
                wpb.PrefillRequest(
                    request_id=ev.request_id,
                    layout=s.layout,
                    prompt_token_ids=request.prompt_token_ids,
                    sampling=request.sampling,
                    adapter=request.adapter,
                    skip_tokens=ev.skip_tokens,
                    kv_idle_timeout_s=s.stall_watch.idle_timeout,
                ),
                timeout=_remaining(context),
            )
            if not context.add_callback(call.cancel):
                call.cancel()  # the RPC already ended: the pull still unwinds through the abort below
            try:
                with s.stall_watch.watching(call) as watched:
                    for i, (chunk, key, value) in enumerate(call):
                        watched.touch()
                        if i == 0:
                            bad = layout_mismatch(s.layout, chunk.layout)
                            if bad:
                                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, f"prefill worker: {bad}")
                        if chunk.adapter_digest:  # before the first KV payload (or on the last message)
                            bad = adapter_mismatch(request.adapter, digest, chunk.adapter_digest)
                            if bad:
                                raise _Refused(
                                    grpc.StatusCode.FAILED_PRECONDITION,
                                    f"prefill worker {request.prefill_endpoint}: {bad}",
                                )
                        if chunk.last:
                            writer.check_complete()
                            # Checked before the engine sees it: a token past the vocabulary fails the
                            # whole batch's next step (a device-side assert on a GPU).
                            if not 0 <= chunk.first_token < s.engine.model_config.vocab_size:
                                raise ValueError(f"first token {chunk.first_token} is outside the vocabulary")
                            if chunk.num_cached_tokens > n:
                                raise ValueError(
                                    f"{chunk.num_cached_tokens} cached tokens of a {n}-token prompt"
                                )
                            first = chunk
                            break
                        if chunk.num_tokens:
                            writer.write(chunk, key, value)
                            watched.touch()  # the idle time is the prefill worker's, not our copy's
            finally:
                # On a GPU the writes are still queued on a side stream: they must land before the
                # engine reads these blocks (kv_ready below) or frees them for reuse (any abort).
                writer.finish()
        except grpc.RpcError as e:
            s.loop.abort(ev.request_id)
            code = e.code()
            if code == grpc.StatusCode.CANCELLED and watched is not None and watched.stalled:
                # UNAVAILABLE naming the prefill worker: the router takes that worker out of
                # rotation and, with nothing streamed to the client yet, retries on another pair.
                context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"prefill worker {request.prefill_endpoint} stalled: no KV for "
                    f"{s.stall_watch.idle_timeout:g} s",
                )
            if code in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
            ):
                context.abort(code, e.details())
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                context.abort(code, "deadline exceeded while pulling KV from the prefill worker")
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # Busy, not failed: the router tries another prefill worker and keeps this one.
                context.abort(code, f"prefill worker {request.prefill_endpoint} is busy: {e.details()}")
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"prefill worker {request.prefill_endpoint} failed: {e.details()}",
            )
        except _Refused as e:
            s.loop.abort(ev.request_id)
            context.abort(e.code, e.message)
        except ValueError as e:  # a malformed chunk: never write garbage, fail the request cleanly
            s.loop.abort(ev.request_id)
            context.abort(grpc.StatusCode.DATA_LOSS, f"prefill worker {request.prefill_endpoint}: {e}")
        if first is None:
            s.loop.abort(ev.request_id)
            context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker ended the KV stream early")
        return first


class _CancelGuard:
    """Cancels a request when its RPC ends early (the client went away, the deadline passed), but
    not while KV is being written into its reserved blocks: freed then, the blocks could be handed
    to another sequence while the copies still land in them. The pull sees the cancellation too
    (its call to the prefill worker is cancelled with the RPC) and frees the blocks itself once its
    writes are done; any cancellation that arrived meanwhile is applied then. A cancellation that
    came first (while the step reserving the blocks ran) has already freed them: no write starts."""

    def __init__(self, stream, done: threading.Event) -> None:
        self._stream, self._done = stream, done
        self._lock = threading.Lock()
        self._writing = self._deferred = self._cancelled = False

    def rpc_ended(self) -> None:
        if self._done.is_set():
            return
        with self._lock:
            if self._writing:
                self._deferred = True
                return
            self._cancelled = True
        self._stream.cancel()

    @contextlib.contextmanager
    def writing_kv(self) -> Iterator[None]:
        """Raises RequestAborted when the request was cancelled before its KV could be written."""
        with self._lock:
            if self._cancelled:
                raise RequestAborted("cancelled before its KV was pulled")
            self._writing = True
        try:
            yield
        finally:
            with self._lock:
                self._writing, deferred = False, self._deferred
            if deferred and not self._done.is_set():
                self._stream.cancel()


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Sent:
    """What one KV pull sent: payload bytes, and whether its last message went out."""

    def __init__(self) -> None:
        self.bytes = 0
        self.completed = False


class KVTransferService(wgrpc.KVTransferServicer):
    def __init__(self, state: WorkerState) -> None:
        self.s = state

    def Prefill(self, request: wpb.PrefillRequest, context: grpc.ServicerContext):  # noqa: N802
        tally = _Sent()
        t0 = time.monotonic()
        try:
            yield from self._send_kv(request, context, tally)
        finally:  # also a refusal (context.abort raises), as the decode side counts it
            metrics.kv_transfer_ended("sent", tally.completed, tally.bytes, time.monotonic() - t0)

    def _send_kv(
        self, request: wpb.PrefillRequest, context: grpc.ServicerContext, tally: _Sent
    ) -> Iterator[bytes]:
        s = self.s
        if s.draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
        _refuse_if_stuck(s, context)
        bad = layout_mismatch(s.layout, request.layout)
        if bad:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"decode worker: {bad}")
        unsent, most = s.loop.kv_unsent_bytes, s.engine.config.kv_send_backlog_total_bytes
        if unsent > most:
            # Readers slower than this worker computes: more pulls would only pile up host memory.
            # Busy, not failed: the decode worker passes this on and the router tries another
            # prefill worker (or answers 429), keeping this one in rotation.
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{unsent / 2**20:.0f} MiB of KV wait for slow readers (the limit is {most / 2**20:.0f} MiB)",
            )
        rid = f"kv-{request.request_id or uuid.uuid4().hex}"
        adapter = request.adapter
        # Read before the request is submitted, so before it can run: see `_adapter_digest`.
        changes = s.engine.lora.version(adapter)[1] if adapter else 0
        try:
            params = params_from_pb(request.sampling, max_tokens=1)
            # Tokens the decode side already holds (its prefix cache) are never sent.
            stream = s.loop.submit(
                list(request.prompt_token_ids),
                params,
                rid,
                kv_sink=True,
                kv_skip=request.skip_tokens,
                adapter=request.adapter,
            )
        except (RequestError, QueueFull, EngineDead) as e:
            _abort_for(context, e)
        done = threading.Event()
        if not context.add_callback(lambda: None if done.is_set() else stream.cancel()):
            stream.cancel()  # the RPC already ended: no callback would come
        # The puller's timeout, not ours: the two workers' settings may differ (flags, a rollout).
        # 0 (or nonsense) is a decode worker that does not say: ours, as both used to share it.
        theirs = request.kv_idle_timeout_s
        heartbeat_s = kv_heartbeat(theirs) if theirs > 0 else s.kv_heartbeat_s
        first_msg = True
        digest_sent = not adapter  # the adapter's digest goes before the first KV payload
        try:
            for ev in stream.events(heartbeat_s=heartbeat_s):
                if isinstance(ev, Heartbeat):
                    # Queued behind other prompts, or a long chunk computes: nothing to send, but
                    # the engine is not stuck. A message with no KV keeps the pull from timing out.
                    yield encode_kv_chunk(wpb.KVChunk(layout=s.layout) if first_msg else wpb.KVChunk())
                    first_msg = False
                    continue
                if isinstance(ev, KVPiece):
                    if first_msg or not digest_sent:
                        # The handshake: our layout travels first, alone (unless a heartbeat took
                        # it), with the version of the adapter the KV was computed with.
                        head = wpb.KVChunk(layout=s.layout) if first_msg else wpb.KVChunk()
                        if not digest_sent:
                            head.adapter_digest = self._adapter_digest(adapter, changes, context)
                            digest_sent = True
                        yield encode_kv_chunk(head)
                        first_msg = False
                    if ev.ready is not None:
                        # GPU: the pinned copy may still be in flight. Wait here, in the gRPC
                        # thread, so the engine thread goes on computing the next layers.
                        ev.ready.synchronize()
                    yield from kv_chunks(ev.layer, ev.start, ev.key, ev.value)
                    # KV payload bytes, as the decode side counts them (not the message framing),
                    # once gRPC took all of them: an aborted transfer counts what left.
                    tally.bytes += ev.nbytes
                    continue
                assert isinstance(ev, RequestOutput) and ev.finished
                done.set()
                if ev.error is not None:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, ev.error)
                last = wpb.KVChunk(
                    last=True,
                    first_token=ev.token_ids[0],
                    num_cached_tokens=ev.num_cached_tokens,
                )
                if ev.logprobs:
                    last.first_logprob = ev.logprobs[0]
                if ev.top_logprobs:
                    last.first_top_logprobs.CopyFrom(top_logprobs_to_pb(ev.top_logprobs[0]))
                if ev.prompt_logprobs is not None:
                    last.prompt_logprobs.CopyFrom(
                        prompt_logprobs_to_pb(ev.prompt_logprobs, ev.prompt_top_logprobs)
                    )
                if first_msg:
                    last.layout.CopyFrom(s.layout)
                if not digest_sent:
                    last.adapter_digest = self._adapter_digest(adapter, changes, context)
                yield encode_kv_chunk(last)
                tally.completed = True  # gRPC took the last message
        except RequestAborted:
            done.set()
            return
        except _STREAM_ABORTS as e:
            done.set()
            _abort_for(context, e)
        finally:
            if not done.is_set():
                stream.cancel()
            # Also when this generator is only dropped later (an abort's traceback holds it): its
            # unsent pieces must stop counting against the worker's backlog now.
            stream.close_kv()

    def _adapter_digest(self, adapter: str, changes: int, context: grpc.ServicerContext) -> str:
        """The digest of the version of `adapter` this pull's KV was computed with. Read once the
        request has run (its first KV): by then it may also have ended and released its adapter,
        and a read of replaced files taken its place (LoRAManager.version). `changes`, read before
        the request was submitted, tells: the same count, and every read the request could have
        computed with found this digest; else the KV may be of either version, and the pull is
        refused as the decode worker refuses a mismatch (the router retries on another pair)."""
        digest, now = self.s.engine.lora.version(adapter)
        if now != changes:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"prefill worker: incompatible KV layout: adapter {adapter!r} changed (now version "
                f"{short_digest(digest)}) while this prompt's KV was computed with it",
            )
        return digest


class AdminService(wgrpc.AdminServicer):
    def __init__(self, state: WorkerState) -> None:
        self.s = state

    def Stats(self, request: wpb.StatsRequest, context: grpc.ServicerContext) -> wpb.StatsResponse:  # noqa: N802
        s = self.s
        st = s.loop.stats()  # never waits for a running step
        return wpb.StatsResponse(
            role=s.role,
            model_id=s.model_id,
            num_blocks=st["num_blocks"],
            free_blocks=st["free_blocks"],
            used_blocks=st["used_blocks"],
            cached_blocks=st["cached_blocks"],
            block_size=s.engine.config.block_size,
            running=st["running"],
            waiting=st["waiting"] + st["awaiting_kv"],
            in_flight=s.loop.num_in_flight,
            queued_prompt_tokens=st["queued_prompt_tokens"],
            draining=s.draining.is_set(),
            max_model_len=s.engine.max_model_len,
            adapters_device=st.get("adapters_device", []),
            adapters_host=st.get("adapters_host", []),
            adapter_blocks=st.get("adapter_blocks", 0),
            sampling_controls=SAMPLING_CONTROLS,
        )

    def Drain(self, request: wpb.DrainRequest, context: grpc.ServicerContext) -> wpb.DrainResponse:  # noqa: N802
        self.s.draining.set()
        return wpb.DrainResponse(in_flight=self.s.loop.num_in_flight)

    # Adapter admin runs on the engine thread, between steps: the LoRA manager is not shared.

    def LoadAdapter(self, request: wpb.LoadAdapterRequest, context: grpc.ServicerContext) -> wpb.AdapterInfo:  # noqa: N802
        lora = self.s.engine.lora
        path = request.path or None
        try:
            # The files are read in the background and waited for here, not on the engine thread,
            # where every request's decoding would stall for the read.
            read = self.s.loop.call(lambda: lora.admin_read(request.name, path))
            if read is not None:
                try:
                    read.result(timeout=lora.load_timeout_s)
                except TimeoutError:
                    self.s.loop.call(lambda: lora.forget_admin_read(request.name))
                    context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"adapter {request.name!r}: reading its files took over {lora.load_timeout_s:g} s",
                    )
                except Exception:  # noqa: BLE001 - `load` raises it again, mapped below
                    pass
            info = self.s.loop.call(
                lambda: lora.load(request.name, path, request.to_device), timeout=lora.load_timeout_s
            )
        except Exception as e:  # noqa: BLE001 - mapped to a status below
            _admin_abort(context, e)
        return _info_pb(info)

    def UnloadAdapter(  # noqa: N802
        self, request: wpb.UnloadAdapterRequest, context: grpc.ServicerContext
    ) -> wpb.UnloadAdapterResponse:
        try:
            self.s.loop.call(lambda: self.s.engine.lora.unload(request.name))
        except Exception as e:  # noqa: BLE001
            _admin_abort(context, e)
        return wpb.UnloadAdapterResponse()

    def ListAdapters(  # noqa: N802
        self, request: wpb.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> wpb.ListAdaptersResponse:
        infos = self.s.loop.call(self.s.engine.lora.list)
        return wpb.ListAdaptersResponse(adapters=[_info_pb(i) for i in infos])


def _info_pb(info) -> wpb.AdapterInfo:
    return wpb.AdapterInfo(
        name=info.name,
        tier=info.tier,
        size_bytes=info.size_bytes,
        rank=info.rank,
        pinned=info.pinned,
        digest=info.digest,
    )


def _admin_abort(context: grpc.ServicerContext, e: Exception) -> None:
    if isinstance(e, AdapterNotFoundError):
        context.abort(grpc.StatusCode.NOT_FOUND, str(e))
    if isinstance(e, AdapterBusyError):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    if isinstance(e, AdapterError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, EngineDead):
        context.abort(grpc.StatusCode.UNAVAILABLE, f"worker engine failed: {e}")
    if isinstance(e, TimeoutError):
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the engine did not answer in time")
    raise e


__all__ = ["AdminService", "KVTransferService", "WorkerService", "WorkerState", "params_to_pb"]
