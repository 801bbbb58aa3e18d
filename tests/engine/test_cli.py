"""`tandem generate` as a user runs it: a real process, real model, JSON out, clean errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tandem_worker.engine.sampling_params import SamplingParams
from tandem_worker.server.pb import inference_pb2 as pb
from tandem_worker.server.pb import inference_pb2_grpc as pbgrpc

from .conftest import run_all


def tandem(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandem_worker.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_generate_json_in_input_order_matches_engine(engine, model_dir, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(
        json.dumps(
            {"prompt": "Three facts about Mars:", "max_tokens": 5, "top_logprobs": 2, "prompt_logprobs": 2}
        )
        + "\n\n"
        + json.dumps({"prompt": "What is 2+2?", "chat": True, "max_tokens": 7})
        + "\n"
    )
    r = tandem(
        "generate",
        "--model",
        str(model_dir),
        "--json",
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--prompt",
        "Héllo wörld, the weather is",
        "--prompts-file",
        str(prompts_file),
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == [
        "Héllo wörld, the weather is",
        "Three facts about Mars:",
        "What is 2+2?",
    ]
    assert [len(x["token_ids"]) for x in lines[:2]] == [6, 5]
    # Asked for per prompt: each position's two most likely, greedy's choice first.
    top = lines[1]["top_logprobs"]
    assert len(top) == 5 and all(len(pairs) == 2 for pairs in top)
    assert [pairs[0][0] for pairs in top] == lines[1]["token_ids"]
    assert [pairs[0][1] for pairs in top] == pytest.approx(lines[1]["logprobs"])
    assert "top_logprobs" not in lines[0] and "prompt_logprobs" not in lines[0]
    # The prompt's, as the in-process engine computes them.
    ids = lines[1]["prompt_token_ids"]
    rid = engine.add_request(prompt_token_ids=ids, params=SamplingParams(max_tokens=1, prompt_logprobs=2))
    want = run_all(engine)[rid]
    assert lines[1]["prompt_logprobs"][0] is None and len(lines[1]["prompt_logprobs"]) == len(ids)
    assert lines[1]["prompt_logprobs"][1:] == pytest.approx(want.prompt_logprobs[1:], abs=1e-5)
    assert [[t for t, _ in p] for p in lines[1]["prompt_top_logprobs"]] == [
        [t for t, _ in p] for p in want.prompt_top_logprobs
    ]
    for x in lines:
        assert set(x) >= {"prompt_token_ids", "token_ids", "text", "finish_reason"}
    assert lines[2]["prompt_token_ids"] == engine.tokenizer.chat_prompt("What is 2+2?")
    # The process's greedy tokens equal the in-process engine's.
    rid = engine.add_request(
        prompt_token_ids=lines[0]["prompt_token_ids"],
        params=SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
    )
    out = run_all(engine)[rid]
    assert out.token_ids == lines[0]["token_ids"] and out.text == lines[0]["text"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--prompt", "hi", "--max-tokens", "0"], "max_tokens"),
        (["--prompt", "hi", "--top-p", "1.5"], "top_p"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["--prompt", "hi", "--top-logprobs", "21"], "top_logprobs"),
        (["--prompt", "hi", "--prompt-logprobs", "21"], "prompt_logprobs"),
        (["--prompt", "hi", "--regex", "([0-9]"], "unclosed group"),
        (["--prompt", "hi", "--json-schema", "/nonexistent/schema.json"], "--json-schema"),
        (["--prompt", "hi", "--regex", "a", "--choice", "b"], "not allowed with"),
        (["--prompt", ""], "prompt"),
        ([], "--prompt"),
        (["--prompt", "hi", "--model", "no-such-model"], "no-such-model"),
        (["--prompt", "hi", "--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
        (["--prompts-file", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
    ],
)
def test_bad_input_exits_nonzero_with_a_message_and_no_traceback(args, needle):
    r = tandem("generate", *args, timeout=120)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


# --- argument validation: refused by argparse (exit 2, naming the flag) before anything starts ---


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["up", "--port", "99999"], "--port"),  # gRPC would listen on 99999 % 65536
        (["up", "--port", "-5"], "--port"),
        (["up", "--port", "0"], "--port"),  # would health-check host:0 for minutes
        (["up", "--http-port", "65536"], "--http-port"),
        (["up", "--kserve-port", "-1"], "--kserve-port"),
        (["router", "--decode", "127.0.0.1:1", "--http-port", "99999"], "--http-port"),
        (["router", "--decode", "127.0.0.1:1", "--http-port", "-1"], "--http-port"),
        (["router", "--decode", "127.0.0.1:1", "--metrics-port", "99999"], "--metrics-port"),
        (["router", "--decode", "127.0.0.1:1", "--port", "0"], "--port"),
        (["worker", "--role", "decode", "--port", "70000"], "--port"),
        (["worker", "--role", "decode", "--metrics-port", "-2"], "--metrics-port"),
        (["up", "--port", "http"], "--port"),
    ],
)
def test_ports_out_of_range_are_argparse_errors(argv, flag, capsys):
    from tandem_worker.cli import build_parser

    # The parser alone: a regression must fail here, not start the deployment it failed to refuse.
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "Traceback" not in err


def test_port_zero_is_accepted_only_where_it_means_off():
    from tandem_worker.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["router", "--http-port", "0", "--kserve-port", "0", "--metrics-port", "0"]).http_port == 0
    assert parse(["worker", "--role", "decode", "--metrics-port", "0"]).metrics_port == 0
    assert parse(["up", "--http-port", "0", "--kserve-port", "0"]).kserve_port == 0
    assert parse(["up", "--port", "65535"]).port == 65535


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["demo", "--max-tokens", "0"], "--max-tokens"),
        (["up", "--colocated", "-2"], "--colocated"),
        (["up", "--prefill", "-1"], "--prefill"),
        (["up", "--decode", "-1"], "--decode"),
        (["up", "--kv-cache-bytes", "0"], "--kv-cache-bytes"),
        (["up", "--slo-ttft-ms", "0"], "--slo-ttft-ms"),
        (["up", "--autoscale", "--window", "0"], "--window"),
        (["up", "--autoscale", "--cooldown", "-5"], "--cooldown"),
        (["up", "--autoscale", "--min-requests", "-1"], "--min-requests"),
        (["up", "--autoscale", "--max-decode", "0"], "--max-decode"),
        (["up", "--autoscale", "--scrape-interval", "nan"], "--scrape-interval"),
        (["router", "--decode", "127.0.0.1:1", "--max-in-flight", "-100"], "--max-in-flight"),
        (["router", "--decode", "127.0.0.1:1", "--slo-tpot-ms", "-1"], "--slo-tpot-ms"),
        (["worker", "--role", "decode", "--max-pending", "0"], "--max-pending"),
        (["worker", "--role", "decode", "--cuda-graph-max-batch", "-1"], "--cuda-graph-max-batch"),
        (["bench", "--trace", "t.csv", "--endpoint", "h:1", "--max-requests", "-1"], "--max-requests"),
        (["bench", "--trace", "t.csv", "--endpoint", "h:1", "--slo-ttft-ms", "-1"], "--slo-ttft-ms"),
        (["bench", "--trace", "t.csv", "--endpoint", "h:1", "--time-scale", "inf"], "--time-scale"),
        (["generate", "--endpoint", "h:1", "--prompt", "hi", "--timeout", "0"], "--timeout"),
        (["generate", "--endpoint", "h:1", "--prompt", "hi", "--timeout", "-3"], "--timeout"),
        (["up", "--autoscale", "--prometheus", "notaurl"], "--prometheus"),
        (["up", "--autoscale", "--prometheus", "localhost:9090"], "--prometheus"),
    ],
)
def test_bad_counts_and_durations_are_argparse_errors(argv, flag, capsys):
    from tandem_worker.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "Traceback" not in err


def test_zero_is_accepted_where_it_means_none():
    from tandem_worker.cli import build_parser

    args = build_parser().parse_args(
        ["up", "--autoscale", "--cooldown", "0", "--min-requests", "0", "--burst-horizon", "0"]
    )
    assert (args.cooldown, args.min_requests, args.burst_horizon) == (0.0, 0, 0.0)
    args = build_parser().parse_args(["worker", "--role", "decode", "--cuda-graph-max-batch", "0"])
    assert args.cuda_graph_max_batch == 0


def test_demo_checks_its_sampling_params_before_starting(monkeypatch):
    from tandem_worker.server import demo as demo_mod

    class NeverStart:
        def __init__(self, **kwargs):
            pass

        def start(self):
            raise AssertionError("the deployment started before max_tokens was checked")

    monkeypatch.setattr(demo_mod, "LocalDeployment", lambda **kw: NeverStart(**kw))
    with pytest.raises(ValueError, match="max_tokens"):
        demo_mod.demo(max_tokens=0)


def test_replay_refuses_a_negative_max_requests():
    from tandem_worker.server.replay import TraceRow, replay

    with pytest.raises(ValueError, match="max_requests"):
        replay(object(), [TraceRow(0.0, 4, 4)] * 3, max_requests=-1)  # type: ignore[arg-type]


# --- `tandem generate --endpoint` against an in-process fake router (no model, no deployment) ---


class FakeRouter(pbgrpc.InferenceServicer):
    """Prompt "slow" streams a token every 20 ms for up to 10 s; "fail" fails once `slow_before_failing`
    slow ones are running; "cut" streams part of a line, then fails as a dying worker does; any other
    prompt gets 3 chunks (the first with the prompt's token ids) and a final one with finish_reason."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        self.slow_before_failing = 1
        self.started = self.cancelled = self.finished_slow = 0
        self.lock = threading.Lock()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=16))
        pbgrpc.add_InferenceServicer_to_server(self, self.server)
        self.endpoint = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def Generate(self, request, context):
        import grpc

        if request.text == "fail":
            self.wait_for("started", self.slow_before_failing)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "this prompt fails")
        if request.text == "slow":
            with self.lock:
                self.started += 1
            completed = False
            try:
                end = time.monotonic() + 10
                while time.monotonic() < end and context.is_active():
                    yield pb.GenerateResponse(text="x", token_ids=[7])
                    time.sleep(0.02)
                completed = context.is_active()
                if completed:
                    yield pb.GenerateResponse(finish_reason=pb.FINISH_REASON_LENGTH)
            finally:
                # A cancelled stream ends at the is_active() check or, when gRPC closes the generator,
                # here at a yield (GeneratorExit): count it either way.
                with self.lock:
                    if completed:
                        self.finished_slow += 1
                    else:
                        self.cancelled += 1
            return
        if request.text == "cut":
            yield pb.GenerateResponse(text="once upon", token_ids=[5, 6], prompt_token_ids=[9])
            yield pb.GenerateResponse(text=" a time", token_ids=[7, 8])
            context.abort(grpc.StatusCode.UNAVAILABLE, "the worker serving this request failed")
        for i in range(3):
            first = {"prompt_token_ids": [len(request.text), 42]} if i == 0 else {}
            yield pb.GenerateResponse(text=f"{request.text}{i} ", token_ids=[i], **first)
        yield pb.GenerateResponse(finish_reason=pb.FINISH_REASON_LENGTH)

    def wait_for(self, counter: str, n: int, timeout: float = 5.0) -> int:
        end = time.monotonic() + timeout
        while getattr(self, counter) < n and time.monotonic() < end:
            time.sleep(0.02)
        return getattr(self, counter)


@pytest.fixture
def fake_router():
    router = FakeRouter()
    yield router
    router.server.stop(0)


def test_complete_all_raises_the_first_error_at_once_and_cancels_the_rest(fake_router):
    import grpc

    from tandem_worker.server.client import Client, build_request

    reqs = [build_request(t, SamplingParams(max_tokens=5)) for t in ("slow", "fail", "slow")]
    fake_router.slow_before_failing = 2
    t0 = time.monotonic()
    with Client(fake_router.endpoint) as client, pytest.raises(grpc.RpcError) as exc:
        client.complete_all(reqs)
    assert time.monotonic() - t0 < 5, "waited for the slow requests before reporting the failure"
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fake_router.wait_for("cancelled", 2) == 2 and fake_router.finished_slow == 0


def test_complete_all_cancels_every_request_on_ctrl_c(fake_router):
    from tandem_worker.server.client import Client, build_request

    reqs = [build_request("slow", SamplingParams(max_tokens=5)) for _ in range(3)]
    # Python leaves SIGINT ignored when it started ignored (pytest run in the background by a script).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupt_once_all_run() -> None:
        fake_router.wait_for("started", 3)
        os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_once_all_run, daemon=True)
    t0 = time.monotonic()
    interrupter.start()
    try:
        with Client(fake_router.endpoint) as client, pytest.raises(KeyboardInterrupt):
            client.complete_all(reqs)
    finally:
        interrupter.join()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - t0 < 5, "Ctrl-C waited for the requests to finish"
    assert fake_router.wait_for("cancelled", 3) == 3 and fake_router.finished_slow == 0


def test_generate_endpoint_reports_a_failure_without_waiting(fake_router, capsys):
    from tandem_worker.cli import main

    t0 = time.monotonic()
    rc = main(["generate", "--endpoint", fake_router.endpoint, "--prompt", "slow", "--prompt", "fail"])
    assert rc == 2 and time.monotonic() - t0 < 5
    assert "INVALID_ARGUMENT: this prompt fails" in capsys.readouterr().err


def test_generate_stream_json_says_which_prompt_each_chunk_belongs_to(fake_router, capsys):
    from tandem_worker.cli import main

    argv = ["generate", "--endpoint", fake_router.endpoint, "--stream", "--json"]
    assert main([*argv, "--prompt", "a", "--prompt", "b"]) == 0
    chunks = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    texts: dict[int, str] = {}
    for c in chunks:
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {0: "a0 a1 a2 ", 1: "b0 b1 b2 "}


def test_generate_stream_json_chunks_add_up_to_the_unstreamed_record(fake_router, capsys):
    # The streamed chunks never said how an answer ended: no finish_reason, no prompt_token_ids.
    from tandem_worker.cli import main

    argv = ["generate", "--endpoint", fake_router.endpoint, "--json", "--prompt", "a", "--prompt", "bb"]
    assert main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main([*argv, "--stream"]) == 0
    chunks = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for index, record in enumerate(records):
        mine = [c for c in chunks if c["index"] == index]
        # Every chunk says whether it ends its answer: null until the last one.
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [record["finish_reason"]]
        assert record["finish_reason"] == "length"
        assert "".join(c["text"] for c in mine) == record["text"]
        assert [t for c in mine for t in c["token_ids"]] == record["token_ids"]
        assert [c["prompt_token_ids"] for c in mine if "prompt_token_ids" in c] == [
            record["prompt_token_ids"]
        ]


def test_generate_stream_cut_off_puts_the_error_on_a_line_of_its_own(fake_router):
    # The error used to land right after the partial text: "once upon a timetandem: error: ...".
    r = subprocess.run(
        [sys.executable, "-m", "tandem_worker.cli", "generate", "--endpoint", fake_router.endpoint]
        + ["--stream", "--prompt", "cut"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # as a terminal shows them: one stream
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stdout.splitlines() == [
        "--- 'cut'",
        "once upon a time",
        f"tandem: error: {fake_router.endpoint}: UNAVAILABLE: the worker serving this request failed",
    ]


@pytest.mark.parametrize(
    "extra",
    [
        ["--model", "/nonexistent/x.gguf", "--device", "bogus"],
        ["--lora-store", "/nonexistent/adapters"],
        ["--kv-cache-bytes", "1000000"],
        ["--model", "smollm2-135m"],  # even the default, when it is said explicitly
    ],
)
def test_generate_endpoint_refuses_offline_only_flags(fake_router, extra, capsys):
    from tandem_worker.cli import main

    rc = main(["generate", "--endpoint", fake_router.endpoint, "--prompt", "a", *extra])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert extra[0] in captured.err and "offline only" in captured.err


@pytest.mark.parametrize("extra", [["--stream"], ["--timeout", "5"]])
def test_generate_offline_refuses_endpoint_only_flags(extra, capsys):
    from tandem_worker.cli import main

    assert main(["generate", "--prompt", "a", *extra]) == 2
    assert f"{extra[0]}: only with --endpoint" in capsys.readouterr().err


def test_bench_judges_requests_by_the_slos_the_router_counts_them_by():
    # `tandem bench` defaulted to 1000/100 ms while `tandem up` and `tandem router` default to
    # 2000/200 ms: the same requests were met in the router's counts and missed in the report.
    from tandem_worker.cli import build_parser

    parse = build_parser().parse_args
    defaults = {
        cmd: (a.slo_ttft_ms, a.slo_tpot_ms)
        for cmd, a in (
            ("bench", parse(["bench", "--trace", "t.csv", "--endpoint", "h:1"])),
            ("up", parse(["up"])),
            ("router", parse(["router", "--decode", "h:2"])),
        )
    }
    assert len(set(defaults.values())) == 1, defaults


def test_worker_flags_reach_the_engine_config(monkeypatch):
    from tandem_worker import cli
    from tandem_worker.server import worker_main

    seen = []
    monkeypatch.setattr(worker_main, "serve_worker", lambda role, config, *a, **k: seen.append(config) or 0)
    args = cli.build_parser().parse_args(
        [
            "worker",
            "--role",
            "decode",
            "--cuda-graph-max-lora-rank",
            "32",
            "--cuda-graph-lora-fold-rank",
            "64",
            "--sampling-seed",
            "9",
        ]
    )
    cli._cmd_worker(args)
    assert (seen[0].cuda_graph_max_lora_rank, seen[0].cuda_graph_lora_fold_rank) == (32, 64)
    assert seen[0].sampling_seed == 9
    args = cli.build_parser().parse_args(["worker", "--role", "decode"])
    cli._cmd_worker(args)
    assert seen[1].cuda_graph_lora_fold_rank == 0  # off unless asked for
    assert seen[1].sampling_seed is None  # a random stream per process
