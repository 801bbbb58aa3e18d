"""`tandem router`: the gRPC inference endpoint in front of prefill and decode (or colocated) workers.

For each request it tokenizes (chat template for messages), picks a (decode, prefill) pair from
the `WorkerPool`, forwards the token ids, and streams text back, detokenized incrementally and cut
at stop strings. A request that has streamed nothing is retried on another pair when a worker
fails; once tokens have been streamed, a failure ends the stream with the worker's status. A worker
that refuses a request because it drains (a rollout, a scale-down) is only skipped for it: its next
health check takes it out of rotation, and it never backs off as a failed one does.
Deadlines and cancellation travel downstream with the call.

Every request counts in exactly one outcome of `tandem_requests_total` (the frontends' requests
too: they call this service): met, missed_ttft or missed_tpot when answered; invalid, rejected or
failed when refused or failed; and when its client ended it first (cancelled, or past the
deadline it set), by what it had already missed: missed_ttft when it waited longer than the TTFT
SLO for its first token, missed_tpot when its tokens, counting the wait for the next one, came
slower than the TPOT SLO, else `cancelled` or `timed_out`. Attainment leaves those two out, as it
does invalid requests: the client's choice says nothing of the service, whereas a client that gave
up on a late answer is a miss, which would otherwise vanish from the totals exactly when the
service is slow.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

import grpc

from ..engine import structured
from ..engine.sampling_params import RequestError, SamplingParams
from ..engine.tokenizer import TextStream, Tokenizer
from . import metrics
from .convert import FINISH_TO_PB, params_from_pb
from .handoff import Handoffs
from .health import DRAINING
from .pb import inference_pb2 as pb
from .pb import inference_pb2_grpc as pbgrpc
from .pb import worker_pb2 as wpb
from .pb import worker_pb2_grpc as wgrpc
from .worker_pool import WorkerPool

log = logging.getLogger(__name__)

# Before any token: a worker down or busy, or a prefill worker's malformed KV stream (DATA_LOSS).
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS}
# Before any token: an error inside a worker (an exception: INTERNAL, or UNKNOWN when nothing caught
# it) may be the worker's or the request's own, so another pair tries it once; the worker stays in
# rotation (one request's failure says little about it; a broken worker fails its health checks).
FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# A worker's message for these is about the request itself, so the caller's; the others' name
# workers and their internals (addresses, stack text), which the log gets instead.
CALLER_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.OUT_OF_RANGE,
}


def _draining(code: grpc.StatusCode, details: str) -> bool:
    """The refusal of a worker that is draining: not a fault. Its health check reports the drain and
    takes it out of rotation; a backoff on top (and a warning on every rollout) would only mislead."""
    return code == grpc.StatusCode.UNAVAILABLE and details.endswith(DRAINING)


def _worker_failed(code: grpc.StatusCode, sent_first: bool) -> str:
    """What the client is told of a worker's failure (its own message names workers and internals)."""
    return f"the worker serving this request failed ({code.name})" + (
        " after part of the answer was sent; send the request again" if sent_first else ""
    )


def _retryable(code: grpc.StatusCode, details: str) -> bool:
    # A pair whose KV layouts differ (a rolling upgrade): another pair can serve the request.
    return code in RETRYABLE or (
        code == grpc.StatusCode.FAILED_PRECONDITION and "incompatible KV layout" in details
    )


@dataclass
class SLO:
    ttft_seconds: float = 2.0
    tpot_seconds: float = 0.2


@dataclass
class _Progress:
    """One admitted request's progress: what it is judged by if its client ends it, and whether its
    outcome has been counted (exactly once, whichever way it ends)."""

    arrival: float
    first_token_time: float | None = None
    n_tokens: int = 0
    counted: bool = False


class RouterService(pbgrpc.InferenceServicer):
    def __init__(
        self,
        pool: WorkerPool,
        tokenizer: Tokenizer,
        model_name: str,
        max_model_len: int,
        eos_token_ids: set[int],
        max_in_flight: int = 512,
        max_attempts: int = 3,
        slo: SLO | None = None,
    ) -> None:
        self.pool = pool
        self.tok = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.eos = eos_token_ids
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self.slo = slo or SLO()
        self._in_flight = 0
        self._lock = threading.Lock()
        # The frontends in this process forward through these (see handoff.py).
        self.handoffs = Handoffs(self._count_unbegun)

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:  # noqa: N802
        return pb.ListModelsResponse(
            models=[
                pb.ModelCard(
                    id=self.model_name, max_model_len=self.max_model_len, adapters=self.pool.adapters()
                )
            ]
        )

    def _tokenize(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "text":
            if not request.text:
                raise RequestError("prompt", "must not be empty")
            return self.tok.encode(request.text)
        if kind == "chat":
            return self.tok.chat_messages(request.chat.messages, request.chat.tools_json)
        if kind == "token_ids":
            return list(request.token_ids.ids)
        raise RequestError("prompt", "set one of text, chat or token_ids")

    def _validate(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        if request.model and request.model != self.model_name:
            raise RequestError(
                "model", f"{request.model!r} is not served here; this endpoint serves {self.model_name!r}"
            )
        params = params_from_pb(request.sampling)
        if params.structured_outputs is not None:
            # What the vocabulary does not change (a bad regex, schema or Lark), before any worker
            # computes the prompt; the serving worker compiles it against its tokenizer.
            structured.check(params.structured_outputs)
        ids = self._tokenize(request)
        if not ids:
            raise RequestError("prompt", "must not be empty")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                "prompt",
                f"{len(ids)} tokens leave no room to generate in the model's context of {self.max_model_len}",
            )
        # A prompt no worker could ever hold is the caller's error, not a lack of healthy workers.
        capacity = self.pool.kv_capacity_tokens()
        if capacity is not None and len(ids) >= capacity:
            raise RequestError(
                "prompt",
                f"{len(ids)} tokens can never fit in a worker's KV cache ({capacity} tokens); "
                "shorten the prompt or give the workers a larger KV cache budget",
            )
        return ids, params

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):  # noqa: N802
        arrival = time.monotonic()
        if not self.handoffs.begin(context):
            # Its frontend gave up on it before this handler began, and counted it then.
            context.abort(grpc.StatusCode.CANCELLED, "the request ended before the router took it")
        try:
            ids, params = self._validate(request)
        except RequestError as e:
            metrics.REQUESTS.labels(outcome="invalid").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                metrics.REQUESTS.labels(outcome="rejected").inc()
                metrics.ROUTER_REJECTED.inc()
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"router queue is full ({self.max_in_flight} in flight)",
                )
            self._in_flight += 1
        progress = _Progress(arrival)
        try:
            yield from self._generate(request, context, ids, params, progress)
        except Exception:
            if not progress.counted:  # a fault of the router's own (an abort comes counted)
                self._count(progress, "failed")
            raise
        finally:
            with self._lock:
                self._in_flight -= 1
            if not progress.counted:
                # Neither answered nor failed: its client ended it, while the router waited for the
                # worker (the call's cancellation returns) or at a yield (gRPC closes the generator).
                self._count(progress, self._client_ended(progress, _past_deadline(context)))

    def _generate(self, request, context, ids: list[int], params: SamplingParams, progress: _Progress):
        rid = request.request_id or uuid.uuid4().hex
        special = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos)
        text = TextStream(self.tok, ids, params)
        sent_first = False
        arrival = progress.arrival
        exclude: set[str] = set()
        last_error = "no healthy worker can take this request"
        busy = ""  # a worker refused the request as over its limit (RESOURCE_EXHAUSTED): why
        busy_pools: set[str] = set()  # the pools whose workers refused it so
        fault: grpc.StatusCode | None = None  # the last attempt failed inside a worker (FAULTS)
        fault_retried = False  # one retry for those per request
        controls = params.controls
        for attempt in range(self.max_attempts):
            pair = self.pool.pick(len(ids), exclude, request.adapter, controls)
            if pair is None and self.pool.all_full(len(ids), exclude, controls):
                # The stats may predate a request that has since finished and freed its blocks.
                self.pool.recheck_decodes()
                pair = self.pool.pick(len(ids), exclude, request.adapter, controls)
            if pair is None:
                break
            if attempt:
                metrics.RETRIES.inc()
            remaining = context.time_remaining()
            timeout = None if remaining is None or remaining > 1e8 else max(remaining, 0.001)
            # Counted as pending before it is sent: a health check whose stats already hold this
            # request's KV then clears it, rather than leaving it counted twice (once in the stats,
            # once as pending) until the next check, which made a retry see every KV cache full.
            ticket = self.pool.begin(pair, len(ids))
            try:
                call = wgrpc.WorkerStub(pair.decode.channel).Generate(
                    wpb.WorkerGenerateRequest(
                        # Unique per attempt: clients' ids are not unique across clients, and a
                        # worker refuses an id it still has in flight (a retry could follow its
                        # failed attempt before that attempt's abort reached the engine).
                        request_id=f"{rid}.{uuid.uuid4().hex[:8]}",
                        prompt_token_ids=ids,
                        sampling=request.sampling,
                        adapter=request.adapter,
                        prefill_endpoint=pair.prefill.address if pair.prefill else "",
                    ),
                    timeout=timeout,
                )
                if not context.add_callback(call.cancel):
                    call.cancel()  # our client already left: no callback would come
                for msg in call:
                    now = time.monotonic()
                    if msg.token_ids and progress.first_token_time is None:
                        progress.first_token_time = now
                        # Now, not when the answer ends: a long answer would otherwise report its
                        # TTFT (which the autoscaler reads) a whole generation late, or never if
                        # it failed or its client left after the first token.
                        metrics.TTFT_SECONDS.observe(now - arrival)
                    delta = text.push(list(msg.token_ids), special)
                    used = text.used  # tokens after one that completed a stop string are dropped
                    progress.n_tokens += used
                    finished = (
                        msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED or text.stopped_by is not None
                    )
                    out = pb.GenerateResponse(
                        request_id=rid,
                        text=delta,
                        token_ids=msg.token_ids[:used],
                        logprobs=msg.logprobs[:used],
                        top_logprobs=msg.top_logprobs[:used],
                    )
                    if not sent_first:
                        out.prompt_token_ids.extend(ids)
                        sent_first = True
                    if msg.HasField("prompt_logprobs"):
                        out.prompt_logprobs.CopyFrom(msg.prompt_logprobs)
                    if finished:
                        if text.stopped_by is not None:
                            call.cancel()
                            out.finish_reason = pb.FINISH_REASON_STOP
                            out.stop_reason = text.stopped_by
                        else:
                            out.text += text.finish()
                            out.finish_reason = msg.finish_reason
                            if text.stopped_by is not None:  # completed by the last character's end
                                out.finish_reason = pb.FINISH_REASON_STOP
                                out.stop_reason = text.stopped_by
                        first_token_time, n_tokens = progress.first_token_time, progress.n_tokens
                        e2e = now - arrival
                        ttft = (first_token_time or now) - arrival
                        tpot = (
                            (now - first_token_time) / (n_tokens - 1)
                            if n_tokens > 1 and first_token_time
                            else 0.0
                        )
                        out.usage.CopyFrom(
                            pb.Usage(
                                prompt_tokens=len(ids),
                                completion_tokens=n_tokens,
                                cached_prompt_tokens=msg.num_cached_tokens,
                            )
                        )
                        out.timings.CopyFrom(
                            pb.Timings(
                                queue_seconds=msg.timings.queue_seconds, ttft_seconds=ttft, e2e_seconds=e2e
                            )
                        )
                        self._observe(progress, ttft, tpot, e2e, msg.timings.queue_seconds)
                        # Its workers served a whole answer: a failure before no longer keeps them
                        # out of rotation, nor lengthens their next backoff.
                        self.pool.succeeded(pair, ticket)
                        yield out
                        return
                    yield out
                # The stream ended without a finish reason: the worker went away.
                raise _Ended()
            except (grpc.RpcError, _Ended) as e:
                code = e.code() if isinstance(e, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
                details = e.details() if isinstance(e, grpc.RpcError) else "worker stream ended early"
                if code == grpc.StatusCode.CANCELLED and not context.is_active():
                    return  # our client went away: Generate counts it
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    # The deadline passed down with the call: the client's own, not a worker's fault.
                    self._count(progress, self._client_ended(progress, past_deadline=True))
                    context.abort(code, details)
                fault = code if code in FAULTS else None
                retry_fault = fault is not None and not fault_retried
                fault_retried = fault_retried or retry_fault
                if sent_first or not (_retryable(code, details) or retry_fault):
                    if sent_first and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS):
                        # The decode worker went away mid-answer (its prefill partner was done): it
                        # backs off as one that failed before the first token does.
                        self.pool.mark_failed(pair.decode, details, ticket)
                    caller_error = code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
                    self._count(progress, "invalid" if caller_error else "failed")
                    # Which worker is the operator's to know (the log), not the client's.
                    log.warning("request %s: %s (decode worker %s)", rid, details, pair.decode.address)
                    context.abort(code, details if code in CALLER_CODES else _worker_failed(code, sent_first))
                failed = (
                    pair.decode if pair.prefill is None or "prefill worker" not in details else pair.prefill
                )
                draining = _draining(code, details)
                cause = details
                if failed is pair.prefill and code == grpc.StatusCode.UNAVAILABLE and not draining:
                    failed = self.pool.blame_pull_fault(pair)  # or the decode worker, pulling from many
                    if failed is pair.decode:
                        cause = f"its KV pulls from more than one prefill worker failed, the last: {details}"
                if draining:
                    pass  # leaving, not broken: excluded for this request only
                elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS):
                    self.pool.mark_failed(failed, cause, ticket)
                elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    busy = details  # busy, not broken: stays in rotation, only not retried now
                    busy_pools.add("prefill" if failed is pair.prefill else "decode")
                exclude.add(failed.address)
                last_error = details
                log.log(
                    logging.INFO if draining else logging.WARNING,
                    "request %s attempt %d failed before any token: %s",
                    rid,
                    attempt,
                    details,
                )
            finally:
                self.pool.end(pair, ticket)
        decode_full = self.pool.all_full(len(ids), exclude, controls)
        if busy or decode_full:
            # Prefill's only when prefill workers alone refused it and a decode worker had room: with
            # decode short too, more prefill would not have served it.
            pool = "prefill" if busy_pools == {"prefill"} and not decode_full else "decode"
            self._count(progress, "rejected")
            metrics.POOL_REJECTED.labels(pool=pool).inc()
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "workers are at their limit right now; retry later"
                if busy
                else "every decode worker's KV cache is full right now; retry later",
            )
        self._count(progress, "failed")
        log.warning("request %s: no worker pair could serve it (last error: %s)", rid, last_error)
        if fault is not None:
            # No other pair to try it on: the worker's failure, as it would have been without the retry.
            context.abort(fault, _worker_failed(fault, sent_first=False))
        if exclude:
            why = f"{len(exclude)} worker(s) failed it"
        elif self.pool.missing_controls(len(ids), controls):
            why = (
                f"no worker applies {', '.join(sorted(controls))} (workers of an older build, a rolling "
                "upgrade under way?); retry later, or leave those fields unset"
            )
        else:
            # The operator's view, and the client's: which kind of worker is missing.
            why = self.pool.serving_problem() or "no healthy worker can take it"
        context.abort(grpc.StatusCode.UNAVAILABLE, f"no worker pair could serve the request: {why}")

    def _observe(self, progress: _Progress, ttft: float, tpot: float, e2e: float, queue: float) -> None:
        if progress.first_token_time is None:  # an answer of no tokens: its end is its first response
            metrics.TTFT_SECONDS.observe(ttft)
        metrics.E2E_SECONDS.observe(e2e)
        metrics.QUEUE_SECONDS.observe(queue)
        if tpot:
            metrics.TPOT_SECONDS.observe(tpot)
        self._count(progress, self._judge(ttft, tpot))

    def _judge(self, ttft: float, tpot: float) -> str:
        if ttft > self.slo.ttft_seconds:
            return "missed_ttft"
        if tpot > self.slo.tpot_seconds:
            return "missed_tpot"
        return "met"

    def _client_ended(self, progress: _Progress, past_deadline: bool) -> str:
        """The outcome of a request its client ended now: a miss it had already made, else cancelled
        or timed_out. The TTFT and TPOT it is judged by are lower bounds of what the client would
        have seen: no first token until now, or no next token until now."""
        now = time.monotonic()
        first = progress.first_token_time
        if first is None:
            outcome = self._judge(now - progress.arrival, 0.0)
        else:
            outcome = self._judge(first - progress.arrival, (now - first) / max(progress.n_tokens, 1))
        if outcome != "met":
            return outcome
        return "timed_out" if past_deadline else "cancelled"

    def _count_unbegun(self, arrival: float, code: grpc.StatusCode) -> None:
        """A request a frontend forwarded that ended (with `code`) before this service took it."""
        progress = _Progress(arrival)
        if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
            outcome = self._client_ended(progress, code == grpc.StatusCode.DEADLINE_EXCEEDED)
        else:  # this service unreachable (stopping, say): the service's failure
            outcome = "failed"
        self._count(progress, outcome)

    @staticmethod
    def _count(progress: _Progress, outcome: str) -> None:
        progress.counted = True
        metrics.REQUESTS.labels(outcome=outcome).inc()


# A deadline's expiry ends the call as a cancellation does: only the clock tells them apart, and it
# reads a little time left when the client's side expired first and cancelled (its cancellation
# beats this side's deadline by the request's transit time) or gRPC's timer fired early (by a few
# ms). A client that cancels this close to its deadline counts as timed out.
DEADLINE_SLACK_SECONDS = 0.1


def _past_deadline(context: grpc.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_SECONDS


class _Ended(Exception):
    pass


__all__ = ["FINISH_TO_PB", "SLO", "RouterService"]
