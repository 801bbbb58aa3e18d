"""Trace replay (`tandem bench --trace`) against a real gRPC server on loopback with a fake engine.

The fake Inference server answers each Generate with delays it derives from the request: the
prompt length picks the time to first token, the number of tokens asked for picks the time per
output token, and one prompt length fails. So the outcome of every request is known in advance
and the replay's statistics can be checked against it.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures

import grpc
import pytest

from tandem_proto.v1 import inference_pb2 as pb
from tandem_proto.v1 import inference_pb2_grpc as pbgrpc
from tandem_worker.server.replay import TraceRow, load_trace, percentile, replay

FAST_TTFT, SLOW_TTFT = 0.03, 1.0  # prompt of 100 tokens / of 300 tokens
FAST_TPOT, SLOW_TPOT = 0.005, 0.2  # 4 output tokens / 5 output tokens
FAIL_PROMPT = 13
SLO_TTFT, SLO_TPOT = 0.5, 0.1  # wide margins on both sides: the test machine may be busy


class FakeInference(pbgrpc.InferenceServicer):
    def __init__(self) -> None:
        self.seen: list[tuple[float, int, int, bool, float]] = []

    def ListModels(self, request, context):  # noqa: N802
        return pb.ListModelsResponse(models=[pb.ModelCard(id="fake", max_model_len=4096)])

    def Generate(self, request, context):  # noqa: N802
        ids = list(request.token_ids.ids)
        n_out = request.sampling.max_tokens
        self.seen.append(
            (time.monotonic(), len(ids), n_out, request.sampling.ignore_eos, request.sampling.temperature)
        )
        if len(ids) == FAIL_PROMPT:
            context.abort(grpc.StatusCode.INTERNAL, "injected failure")
        time.sleep(SLOW_TTFT if len(ids) >= 300 else FAST_TTFT)
        yield pb.GenerateResponse(prompt_token_ids=ids, token_ids=[7])
        tpot = SLOW_TPOT if n_out == 5 else FAST_TPOT
        for i in range(1, n_out):
            time.sleep(tpot)
            last = i == n_out - 1
            yield pb.GenerateResponse(
                token_ids=[7], finish_reason=pb.FINISH_REASON_LENGTH if last else pb.FINISH_REASON_UNSPECIFIED
            )


@pytest.fixture
def server():
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    fake = FakeInference()
    pbgrpc.add_InferenceServicer_to_server(fake, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", fake
    srv.stop(grace=None)


def mixed_trace() -> tuple[list[TraceRow], dict[str, int]]:
    """Every 50 ms one request; kinds in rotation: met, missed_ttft, missed_tpot, met, failed."""
    kinds = [
        (100, 4, "met"),
        (300, 4, "missed_ttft"),
        (100, 5, "missed_tpot"),
        (100, 4, "met"),
        (FAIL_PROMPT, 4, "failed"),
    ]
    rows, expected = [], {"met": 0, "missed_ttft": 0, "missed_tpot": 0, "failed": 0}
    for i in range(25):
        p, o, kind = kinds[i % len(kinds)]
        rows.append(TraceRow(i * 0.05, p, o))
        expected[kind] += 1
    return rows, expected


def test_replay_statistics_match_the_injected_delays(server):
    endpoint, fake = server
    rows, expected = mixed_trace()
    want = (expected["met"], expected["missed_ttft"], expected["missed_tpot"], expected["failed"])
    # A second try only when the first one's only surprise is a fast request that measured slow
    # (a CI machine stalled for half a second, seen once right after a suite of model processes):
    # a wrong classification, or a slow request measured fast, fails at once.
    for attempt in range(2):
        fake.seen.clear()
        rep = replay(endpoint, rows, slo_ttft_s=SLO_TTFT, slo_tpot_s=SLO_TPOT)
        got = (rep.met, rep.missed_ttft, rep.missed_tpot, rep.failed)
        stalled = [r for r in rep.results if r.outcome == "missed_ttft" and r.prompt_tokens < 300]
        if got == want or attempt == 1 or not stalled or rep.failed != want[3]:
            break
    assert got == want, [(r.prompt_tokens, r.outcome, r.ttft) for r in rep.results]
    assert rep.attainment == pytest.approx(expected["met"] / 25)
    assert rep.goodput == pytest.approx(rep.met / rep.duration_s)
    assert sum("injected failure" in e for e in rep.errors) == 1 and rep.errors
    by_kind = {"met": [], "missed_ttft": [], "missed_tpot": []}
    for r in rep.results:
        if r.outcome in by_kind:
            by_kind[r.outcome].append(r)
    # TTFT: fast ones near FAST_TTFT, slow ones near SLOW_TTFT (loopback gRPC adds a little).
    for r in by_kind["met"] + by_kind["missed_tpot"]:
        assert FAST_TTFT <= r.ttft < SLO_TTFT
    for r in by_kind["missed_ttft"]:
        assert SLOW_TTFT <= r.ttft < SLOW_TTFT + 0.4
    for r in by_kind["missed_tpot"]:
        assert SLOW_TPOT * 0.9 <= r.tpot < SLOW_TPOT + 0.1
        assert r.output_tokens == 5
    # 5 of 20 answered requests are slow to start: p50 is fast, p90 is slow.
    assert FAST_TTFT <= rep.ttft["p50"] < SLO_TTFT <= SLOW_TTFT <= rep.ttft["p90"]
    assert rep.tpot["p50"] < SLO_TPOT < rep.tpot["p90"]
    # The requests went out as asked: token-id prompts of the trace's length, greedy, EOS ignored.
    assert sorted(s[1] for s in fake.seen) == sorted(r.prompt_tokens for r in rows)
    assert all(s[3] and s[4] == 0.0 for s in fake.seen)


def test_replay_is_open_loop_and_time_scaled(server):
    endpoint, fake = server
    rows = [TraceRow(i * 0.1, 300, 4) for i in range(6)]  # each takes ~1 s; they overlap
    rep = replay(endpoint, rows, time_scale=2.0)
    sent = sorted(s[0] for s in fake.seen)
    offsets = [t - sent[0] for t in sent]
    assert all(abs(o - 0.2 * i) < 0.15 for i, o in enumerate(offsets)), offsets  # 0.1 s apart, x2
    assert rep.duration_s < 3.5  # ~2 s: not 6 x 1 s one after another
    assert rep.send_lag_p99_s < 0.25


def test_max_requests_and_model_length(server):
    endpoint, fake = server
    rows = [TraceRow(0.0, 10_000, 8), TraceRow(0.01, 100, 4), TraceRow(0.02, 100, 4)]
    rep = replay(endpoint, rows, max_requests=2)
    assert rep.requests == 2 and len(fake.seen) == 2
    assert max(s[1] for s in fake.seen) == 4096 - 8  # cut to the endpoint's max_model_len


def test_unreachable_endpoint_counts_failures():
    rep = replay("127.0.0.1:1", [TraceRow(0.0, 10, 2)], timeout_s=2.0, max_model_len=100)
    assert rep.failed == 1 and rep.attainment == 0.0


def test_load_trace_formats(tmp_path):
    csv_file = tmp_path / "t.csv"
    csv_file.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:04.5000000,20,3\n"
        "2023-11-16 18:17:03.9799600,4808,10\n"
    )
    rows = load_trace(csv_file)
    assert [(round(r.arrival, 5), r.prompt_tokens, r.output_tokens) for r in rows] == [
        (0.0, 4808, 10),
        (0.52004, 20, 3),
    ]
    jl = tmp_path / "t.jsonl"
    jl.write_text(
        '{"timestamp": 1000, "input_length": 5, "output_length": 2, "hash_ids": [1]}\n'
        '{"timestamp": 3500, "input_length": 7, "output_length": 1}\n'
    )
    assert load_trace(jl) == [TraceRow(0.0, 5, 2), TraceRow(2.5, 7, 1)]
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,1\n")
    with pytest.raises(ValueError, match="bad.csv:2"):
        load_trace(bad)


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 90) == 90
    assert percentile(list(range(1, 101)), 99) == 99


def test_cli_bench_json(server, tmp_path, capsys):
    from tandem_worker.cli import main

    endpoint, _ = server
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(
            json.dumps({"timestamp": i * 50, "input_length": 100 if i % 2 else 300, "output_length": 4})
            + "\n"
            for i in range(6)
        )
    )
    rc = main(
        [
            "bench",
            "--trace",
            str(trace),
            "--endpoint",
            endpoint,
            "--slo-ttft-ms",
            "500",
            "--slo-tpot-ms",
            "100",
            "--max-requests",
            "4",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 4 and out["met"] == 2 and out["missed_ttft"] == 2
    assert out["attainment"] == 0.5
    with pytest.raises(SystemExit) as refused:  # argparse's refusal, before the trace is read
        main(["bench", "--trace", str(trace), "--endpoint", endpoint, "--time-scale", "0"])
    assert refused.value.code == 2
    assert "--time-scale: must be > 0" in capsys.readouterr().err


def test_load_trace_reads_azure_2024_timestamps(tmp_path):
    # The 2024 trace writes a zone, and drops the fraction on whole seconds.
    azure_2024 = tmp_path / "AzureLLMInferenceTrace_code_1week.csv"
    azure_2024.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-12 00:00:00.001163+00:00,1452,3\n"
        "2024-05-12 00:00:00+00:00,584,3\n"
        "2024-05-12 01:00:01.5+01:00,862,38\n"
    )
    rows = load_trace(azure_2024)
    got = [(round(r.arrival, 6), r.prompt_tokens) for r in rows]
    assert got == [(0.0, 584), (0.001163, 1452), (1.5, 862)]


def test_load_trace_reads_timestamps_without_zone_as_utc(tmp_path, monkeypatch):
    """2023's trace has no zone: one second apart stays one second apart wherever the bench runs,
    also across the night Berlin's clocks went back an hour (read as local time: 3601 s)."""
    azure_2023 = tmp_path / "t.csv"
    azure_2023.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-10-29 02:59:59.0,10,1\n2023-10-29 03:00:00.0,20,1\n"
    )
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        assert [r.arrival for r in load_trace(azure_2023)] == [0.0, 1.0]
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(
    "line, why",
    [
        ('{"timestamp": NaN, "input_length": 5, "output_length": 2}', "not a finite number"),
        ('{"timestamp": Infinity, "input_length": 5, "output_length": 2}', "not a finite number"),
        ('{"timestamp": 2000, "input_length": -5, "output_length": 2}', "negative token count"),
    ],
)
def test_load_trace_refuses_rows_it_cannot_replay(tmp_path, line, why):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 1000, "input_length": 5, "output_length": 2}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"t.jsonl:2: not a trace row .*{why}"):
        load_trace(trace)


# (ms, prompt, output) as a trace file lists them: ties at 2000 ms (ordered by length when sorted)
# straddle the cut at 3 rows, and in the unsorted one the first arrival comes last.
SORTED_ROWS = [(1000, 9, 1), (2000, 50, 2), (2000, 7, 3), (2000, 30, 4), (4000, 5, 5)]
UNSORTED_ROWS = [(2000, 50, 2), (4000, 5, 5), (2000, 30, 4), (2000, 7, 3), (1000, 9, 1)]


def _trace_file(folder, rows: list[tuple[int, int, int]], kind: str):
    if kind == "jsonl":
        lines = [json.dumps({"timestamp": t, "input_length": p, "output_length": o}) for t, p, o in rows]
    else:
        lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
            f"2023-11-16 18:00:{t // 1000:02d}.{t % 1000:03d}0000,{p},{o}" for t, p, o in rows
        ]
    path = folder / f"t.{kind}"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
@pytest.mark.parametrize("rows", [SORTED_ROWS, UNSORTED_ROWS], ids=["sorted", "unsorted"])
def test_load_trace_max_requests_keeps_the_rows_the_whole_sorted_trace_starts_with(tmp_path, kind, rows):
    path = _trace_file(tmp_path, rows, kind)
    whole = load_trace(path)
    assert whole == [
        TraceRow(0.0, 9, 1),
        TraceRow(1.0, 7, 3),
        TraceRow(1.0, 30, 4),
        TraceRow(1.0, 50, 2),
        TraceRow(3.0, 5, 5),
    ]
    for n in range(len(rows) + 2):
        assert load_trace(path, max_requests=n) == whole[:n], n
    with pytest.raises(ValueError, match="max_requests must be >= 0"):
        load_trace(path, max_requests=-1)
    empty = tmp_path / f"empty.{kind}"
    empty.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" if kind == "csv" else "")
    with pytest.raises(ValueError, match="no requests"):
        load_trace(empty, max_requests=0)


def test_cli_bench_holds_only_the_requests_it_replays(tmp_path, capsys):
    # `tandem bench --max-requests 3` read and sorted the whole trace first (a 68 MB trace of
    # 1.9 M rows: 9.3 s and 595 MB): now its memory is the rows kept. Here the rows to keep come last
    # in the file, so they must be found by reading it all. Stopped at the endpoint, after the read.
    import tracemalloc

    from tandem_worker.cli import main

    n = 50_000
    trace = tmp_path / "t.jsonl"
    with open(trace, "w") as f:
        for i in range(n, 0, -1):
            f.write(f'{{"timestamp": {i * 10}, "input_length": {i}, "output_length": 1}}\n')
    tracemalloc.start()
    try:
        code = main(["bench", "--trace", str(trace), "--endpoint", "127.0.0.1:1", "--max-requests", "3"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2 and "cannot reach it" in capsys.readouterr().err
    assert peak < 2 * 2**20, f"{peak / 2**20:.1f} MiB for 3 of {n} rows"  # the whole trace: 12.5 MiB
    assert [r.prompt_tokens for r in load_trace(trace, max_requests=3)] == [1, 2, 3]


class StuckInference(pbgrpc.InferenceServicer):
    """Streams one token, then nothing until the client cancels (or 20 s pass)."""

    def __init__(self) -> None:
        self.streaming = threading.Event()
        self.ended = threading.Event()
        self.how = ""

    def Generate(self, request, context):  # noqa: N802
        over = threading.Event()
        context.add_callback(over.set)
        yield pb.GenerateResponse(token_ids=[7])
        self.streaming.set()
        self.how = "cancelled" if over.wait(20) else "still streaming after 20 s"
        self.ended.set()


def test_an_interrupted_replay_cancels_the_requests_in_flight():
    """Ctrl-C in `tandem bench` while a request streams: the replay cancels it and gives control
    back, rather than waiting for the stream to end (up to the 10-minute request timeout)."""
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    stuck = StuckInference()
    pbgrpc.add_InferenceServicer_to_server(stuck, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    main_calls = 0

    def clock() -> float:
        # The replay's own thread reads the clock to start, then before sending each request: the
        # interrupt lands while it waits to send the second one, with the first one streaming.
        nonlocal main_calls
        if threading.current_thread() is threading.main_thread():
            main_calls += 1
            if main_calls == 3:
                assert stuck.streaming.wait(30)
                raise KeyboardInterrupt
        return time.monotonic()

    try:
        with pytest.raises(KeyboardInterrupt):
            replay(
                f"127.0.0.1:{port}",
                [TraceRow(0.0, 5, 4), TraceRow(0.5, 5, 4)],
                timeout_s=None,
                max_model_len=100,
                clock=clock,
            )
        assert stuck.ended.wait(30)
        assert stuck.how == "cancelled"
    finally:
        srv.stop(grace=None)


@pytest.mark.parametrize(
    "name, first_row, paper",
    [
        ("AzureLLMInferenceTrace_conv.csv", "2023-11-16 18:15:46.6805900,100,4", "Splitwise"),
        ("AzureLLMInferenceTrace_code_1week.csv", "2024-05-10 00:00:00.009930+00:00,100,4", "DynamoLLM"),
    ],
)
def test_cli_bench_cites_the_paper_of_the_trace_it_replays(server, tmp_path, capsys, name, first_row, paper):
    from tandem_worker.cli import main

    endpoint, _ = server
    trace = tmp_path / name
    trace.write_text(f"TIMESTAMP,ContextTokens,GeneratedTokens\n{first_row}\n")
    assert main(["bench", "--trace", str(trace), "--endpoint", endpoint]) == 0
    cited = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trace: Azure")]
    assert len(cited) == 1 and paper in cited[0], cited


def write_trace(path, prompt_lengths: list[int]) -> str:
    path.write_text(
        "".join(
            json.dumps({"timestamp": i * 20, "input_length": n, "output_length": 4}) + "\n"
            for i, n in enumerate(prompt_lengths)
        )
    )
    return str(path)


def test_cli_bench_exits_1_when_no_request_succeeds(server, tmp_path, capsys):
    # A replay in which every request failed measured nothing, yet exited 0 like a passing one.
    from tandem_worker.cli import main

    endpoint, _ = server
    trace = write_trace(tmp_path / "t.jsonl", [FAIL_PROMPT] * 3)
    assert main(["bench", "--trace", trace, "--endpoint", endpoint, "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["failed"] == 3  # the report is still printed
    assert captured.err.splitlines() == [
        "tandem: error: no request succeeded (3 of 3 failed; most often: INTERNAL: injected failure)"
    ]
    # One answered request is a measurement, however bad: exit 0.
    trace = write_trace(tmp_path / "t2.jsonl", [FAIL_PROMPT, 100, FAIL_PROMPT])
    assert main(["bench", "--trace", trace, "--endpoint", endpoint]) == 0
    assert capsys.readouterr().err == ""


def test_cli_bench_refuses_an_endpoint_it_cannot_reach_before_replaying(tmp_path, capsys):
    # It waited 10 s for a connection, replayed every request into the void, and exited 0.
    from tandem_worker.cli import main

    trace = write_trace(tmp_path / "t.jsonl", [100, 100])
    assert main(["bench", "--trace", trace, "--endpoint", "127.0.0.1:1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no report of requests that were never sent
    assert captured.err.startswith("tandem: error: 127.0.0.1:1: cannot reach it: UNAVAILABLE")
    assert len(captured.err.splitlines()) == 1


def test_cli_bench_waits_for_a_router_that_is_not_ready_then_refuses_it():
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from tandem_worker.cli import CLIError, _check_endpoint

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    endpoint = f"127.0.0.1:{srv.add_insecure_port('127.0.0.1:0')}"
    srv.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # a router whose workers are starting
        with pytest.raises(CLIError, match="not ready after .* NOT_SERVING"):
            _check_endpoint(endpoint, wait_s=0.5)
        threading.Timer(0.3, servicer.set, ("", health_pb2.HealthCheckResponse.SERVING)).start()
        _check_endpoint(endpoint, wait_s=30)  # returns once it is ready
    finally:
        srv.stop(None)
