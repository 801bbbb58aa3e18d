"""`tandem bench --trace`: replay a request trace against an Inference endpoint, open loop.

Each trace row (arrival time, prompt tokens, output tokens) becomes one streamed `Generate` call
sent at its (time-scaled) arrival time whether or not earlier ones finished: a prompt of that many
token ids (random ids, or one id repeated), `max_tokens` = the output tokens, `ignore_eos`, greedy.
TTFT and TPOT are measured by the client from the stream, from each request's *scheduled* send
time, so a client that falls behind shows up as latency (and as `send_lag` in the report) instead
of silently lowering the load. Outcomes as the router counts them: missed_ttft if TTFT > SLO, else
missed_tpot if the mean time per output token after the first > SLO, else met; an RPC error is
failed. Goodput is met requests per second of replay.

Traces: the Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens; the 2023 one
of Patel et al., "Splitwise", ISCA 2024, or the 2024 one, whose timestamps carry a zone; CC-BY 4.0)
or Mooncake-style JSON lines (timestamp in ms, input_length, output_length). Interrupted (Ctrl-C),
the replay cancels the requests in flight.
"""

from __future__ import annotations

import csv
import heapq
import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc

from .pb import inference_pb2 as pb
from .pb import inference_pb2_grpc as pbgrpc


@dataclass(frozen=True)
class TraceRow:
    arrival: float  # seconds from the trace's first request
    prompt_tokens: int
    output_tokens: int


def _utc_seconds(text: str) -> float:
    """An Azure trace's TIMESTAMP in seconds: 2023's are written without a zone
    ("2023-11-16 18:15:46.6805900"), 2024's with one ("2024-05-10 00:00:00.009930+00:00", and
    "2024-05-12 00:00:00+00:00" without a fraction). One without a zone is read as UTC, not as this
    machine's local time: a local reading adds or removes an hour of arrivals across a
    daylight-saving change."""
    t = datetime.fromisoformat(text.strip())
    # What t.timestamp() of t in UTC gives, to the bit, in a third of the time (replace() and
    # timestamp() took 1 us of a row's 2 us; a week of the 2024 trace is millions of rows).
    return (t - (_EPOCH_NAIVE if t.tzinfo is None else _EPOCH)).total_seconds()


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH_NAIVE = datetime(1970, 1, 1)  # subtracted from a time without a zone: reads it as UTC


def _row(t: float, prompt: int, output: int) -> tuple[float, int, int]:
    # A NaN arrival breaks the sort (later rows land before t0), an infinite one makes the replay's
    # sleep raise after earlier requests were sent; a negative length is no count of tokens.
    if not math.isfinite(t):
        raise ValueError(f"timestamp {t} is not a finite number")
    if prompt < 0 or output < 0:
        raise ValueError(f"negative token count ({prompt} prompt, {output} output)")
    return t, prompt, output


def _read_rows(path: Path) -> Iterator[tuple[float, int, int]]:
    """The rows of an Azure-format CSV or a JSON-lines trace, in file order, one at a time."""
    with open(path, newline="", encoding="utf-8") as f:
        first = f.readline()
        f.seek(0)
        if first.lstrip().startswith("{"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    t = float(d["timestamp"]) / 1000.0
                    row = _row(t, int(d["input_length"]), int(d["output_length"]))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not a trace row ({e})") from None
                yield row
            return
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        try:
            # Positions, not csv.DictReader's dict a row: that dict was most of the time a row took.
            at_t, at_p, at_o = (header.index(c) for c in ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))
        except ValueError:
            raise ValueError(
                f"{path}:1: not an Azure trace header (TIMESTAMP, ContextTokens, GeneratedTokens): {header}"
            ) from None
        for n, fields in enumerate(reader, 2):
            try:
                row = _row(_utc_seconds(fields[at_t]), int(fields[at_p]), int(fields[at_o]))
            except (ValueError, IndexError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a trace row ({e})") from None
            yield row


def load_trace(path: str | Path, max_requests: int | None = None) -> list[TraceRow]:
    """An Azure-format CSV or a JSON-lines trace; arrivals shifted to start at 0, sorted.

    `max_requests`: only the first that many of those rows, the ones the whole trace sorted would
    start with. The file is still read to its end, as nothing says a trace is in time order (the
    ones at hand are, but Mooncake's hold thousands of equal timestamps, which the sort orders by
    length) and every row is checked, but it is streamed: memory is that of the rows kept, not of
    the trace (the week-long files of Azure's 2024 trace)."""
    path = Path(path)
    if max_requests is not None and max_requests < 0:
        raise ValueError(f"max_requests must be >= 0, got {max_requests}")
    rows = _read_rows(path)
    if max_requests is None:
        picked = sorted(rows)
    else:
        # nsmallest is sorted(...)[:n], with a heap of n rows; one row at least, so that an empty
        # trace is still told from max_requests=0.
        picked = heapq.nsmallest(max(1, max_requests), rows)
    if not picked:
        raise ValueError(f"{path}: no requests")
    t0 = picked[0][0]  # the whole trace's first arrival: the smallest row comes first either way
    return [TraceRow(t - t0, max(1, p), max(1, o)) for t, p, o in picked[:max_requests]]


@dataclass
class Result:
    index: int
    scheduled: float  # seconds after the replay's start
    prompt_tokens: int
    max_tokens: int
    send_lag: float = 0.0  # how late the client sent it
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    error: str = ""
    outcome: str = ""


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile, q in [0, 100]."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))]


@dataclass
class Report:
    requests: int
    met: int
    missed_ttft: int
    missed_tpot: int
    failed: int
    duration_s: float
    slo_ttft_s: float
    slo_tpot_s: float
    ttft: dict[str, float | None]
    tpot: dict[str, float | None]
    send_lag_p99_s: float | None
    output_tokens: int
    errors: dict[str, int] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list, repr=False)

    @property
    def attainment(self) -> float:
        return self.met / self.requests if self.requests else 0.0

    @property
    def goodput(self) -> float:
        return self.met / self.duration_s if self.duration_s > 0 else 0.0

    def total_failure(self) -> str | None:
        """Why the replay measured nothing (no request was answered), in one line; None otherwise."""
        if self.requests == 0 or self.failed < self.requests:
            return None
        common = max(self.errors.items(), key=lambda kv: kv[1])[0] if self.errors else "no tokens"
        return f"no request succeeded ({self.failed} of {self.requests} failed; most often: {common})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("results")
        d["attainment"] = self.attainment
        d["goodput_rps"] = self.goodput
        return d

    def table(self) -> str:
        ms = lambda v: "n/a" if v is None else f"{v * 1000:.1f}"
        lines = [
            f"requests {self.requests} in {self.duration_s:.1f}s: met {self.met}, "
            f"missed TTFT {self.missed_ttft}, "
            f"missed TPOT {self.missed_tpot}, failed {self.failed}",
            f"SLO attainment {self.attainment:.1%} (TTFT <= {self.slo_ttft_s * 1000:.0f} ms, "
            f"TPOT <= {self.slo_tpot_s * 1000:.0f} ms); goodput {self.goodput:.2f} req/s; "
            f"output {self.output_tokens / max(self.duration_s, 1e-9):.1f} tok/s",
            "            p50       p90       p99   (ms)",
            "TTFT  " + "".join(f"{ms(self.ttft[k]):>10}" for k in ("p50", "p90", "p99")),
            "TPOT  " + "".join(f"{ms(self.tpot[k]):>10}" for k in ("p50", "p90", "p99")),
            f"client send lag p99 {ms(self.send_lag_p99_s)} ms",
        ]
        for err, n in sorted(self.errors.items()):
            lines.append(f"error x{n}: {err}")
        return "\n".join(lines)


def make_prompt(n: int, mode: str, rng: random.Random, vocab: tuple[int, int]) -> list[int]:
    if mode == "repeat":
        return [vocab[0]] * n
    return [rng.randrange(*vocab) for _ in range(n)]


def replay(
    target: str | pbgrpc.InferenceStub,
    trace: Sequence[TraceRow],
    *,
    time_scale: float = 1.0,
    max_requests: int | None = None,
    slo_ttft_s: float = 1.0,
    slo_tpot_s: float = 0.1,
    prompt_mode: str = "random",
    vocab: tuple[int, int] = (1000, 30000),
    max_model_len: int | None = None,
    timeout_s: float | None = 600.0,
    max_workers: int = 256,
    seed: int = 0,
    clock: Callable[[], float] = time.monotonic,
) -> Report:
    """Replay `trace` against an endpoint (HOST:PORT) or a stub; arrival times are multiplied by
    `time_scale` (2: half the rate, 0.5: twice the rate). Prompts longer than `max_model_len -
    output` are cut to fit (the endpoint's limit, when known)."""
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    if max_requests is not None and max_requests < 0:
        # A negative slice bound would drop rows from the end and replay nearly the whole trace.
        raise ValueError(f"max_requests must be >= 0, got {max_requests}")
    rows = list(trace)[: max_requests if max_requests is not None else None]
    channel = None
    if isinstance(target, str):
        channel = grpc.insecure_channel(target)
        stub = pbgrpc.InferenceStub(channel)
    else:
        stub = target
    if channel is not None:
        try:
            grpc.channel_ready_future(channel).result(timeout=min(10.0, timeout_s or 10.0))
        except grpc.FutureTimeoutError:
            pass  # unreachable: every request will fail and say why
    if max_model_len is None:
        try:
            models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
            max_model_len = models[0].max_model_len if models and models[0].max_model_len else None
        except grpc.RpcError:
            max_model_len = None
    rng = random.Random(seed)
    requests: list[tuple[Result, pb.GenerateRequest]] = []
    for i, row in enumerate(rows):
        out = row.output_tokens
        prompt = row.prompt_tokens
        if max_model_len:
            out = max(1, min(out, max_model_len - 1))
            prompt = max(1, min(prompt, max_model_len - out))
        req = pb.GenerateRequest(
            request_id=f"bench-{i}",
            sampling=pb.SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True),
        )
        req.token_ids.ids.extend(make_prompt(prompt, prompt_mode, rng, vocab))
        requests.append((Result(i, row.arrival * time_scale, prompt, out), req))

    # The streams in flight, so that an interrupted replay (Ctrl-C) can cancel them: otherwise
    # leaving the thread pool waits for each one to finish or time out (timeout_s: 10 minutes).
    in_flight: set[Any] = set()
    in_flight_lock = threading.Lock()
    stopping = threading.Event()

    def run_one(res: Result, req: pb.GenerateRequest, t0: float) -> None:
        start = t0 + res.scheduled
        res.send_lag = max(0.0, clock() - start)
        first = last = None
        call = None
        try:
            call = stub.Generate(req, timeout=timeout_s)
            with in_flight_lock:
                in_flight.add(call)
            if stopping.is_set():  # interrupted before this call was in the set to cancel
                call.cancel()
            for msg in call:
                if msg.token_ids:
                    now = clock()
                    if first is None:
                        first = now
                    last = now
                    res.output_tokens += len(msg.token_ids)
        except grpc.RpcError as e:
            res.error = f"{e.code().name}: {e.details()}"
        finally:
            with in_flight_lock:
                in_flight.discard(call)
        end = clock()
        if first is not None:
            res.ttft = first - start
            res.e2e = end - start
            if res.output_tokens > 1:
                res.tpot = (last - first) / (res.output_tokens - 1)
        if res.error or first is None:
            res.outcome = "failed"
            res.error = res.error or "no tokens"
        elif res.ttft > slo_ttft_s:  # type: ignore[operator]
            res.outcome = "missed_ttft"
        elif res.tpot is not None and res.tpot > slo_tpot_s:
            res.outcome = "missed_tpot"
        else:
            res.outcome = "met"

    n_threads = max(1, min(max_workers, len(requests) or 1))
    try:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            # Start every thread before the clock starts: spawning them on demand delays the first
            # requests by tens of milliseconds, which would read as server latency.
            barrier = threading.Barrier(n_threads + 1)
            for _ in range(n_threads):
                pool.submit(barrier.wait, 30)
            barrier.wait(30)
            t0 = clock()
            futures = []
            try:
                for res, req in requests:
                    delay = t0 + res.scheduled - clock()
                    if delay > 0:
                        time.sleep(delay)
                    futures.append(pool.submit(run_one, res, req, t0))
                for f in futures:
                    f.result()
            except BaseException:
                stopping.set()
                with in_flight_lock:
                    for call in in_flight:
                        call.cancel()
                raise
    finally:
        if channel is not None:
            channel.close()
    duration = clock() - t0
    results = [r for r, _ in requests]
    count = lambda o: sum(r.outcome == o for r in results)
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    ttfts = [r.ttft for r in results if r.ttft is not None and not r.error]
    tpots = [r.tpot for r in results if r.tpot is not None and not r.error]
    pct = lambda xs: {f"p{q}": percentile(xs, q) for q in (50, 90, 99)}
    return Report(
        requests=len(results),
        met=count("met"),
        missed_ttft=count("missed_ttft"),
        missed_tpot=count("missed_tpot"),
        failed=count("failed"),
        duration_s=duration,
        slo_ttft_s=slo_ttft_s,
        slo_tpot_s=slo_tpot_s,
        ttft=pct(ttfts),
        tpot=pct(tpots),
        send_lag_p99_s=percentile([r.send_lag for r in results], 99),
        output_tokens=sum(r.output_tokens for r in results),
        errors=errors,
        results=results,
    )
