"""The KV transfer's knobs and gauges on real `tandem worker` processes.

- `--kv-idle-timeout SECONDS` sets how long a decode worker's KV pull may receive nothing (it wins
  over $TANDEM_KV_IDLE_TIMEOUT_S), and each pull names it to the prefill worker, which beats for it.
- `--kv-send-backlog-total-bytes` bounds a prefill worker's KV unsent over all requests: past it,
  new pulls are refused as busy. `tandem_kv_send_backlog_bytes` shows how much is unsent now.
- Both sides count a KV transfer once it ends, completed or aborted
  (`tandem_kv_transfers_total{direction,outcome}`); the byte and duration metrics
  (`tandem_kv_transfer_bytes_total`, `tandem_kv_transfer_seconds`) take completed ones only, and
  `tandem_kv_transfer_aborted_bytes_total` what aborted ones moved before they ended.
"""

from __future__ import annotations

import threading

import grpc
import pytest

from tandem_proto.v1 import worker_pb2 as wpb
from tandem_proto.v1 import worker_pb2_grpc as wgrpc
from tandem_worker.server.kv_transfer import encode_kv_chunk
from tandem_worker.server.worker_pool import SERVER_KEEPALIVE_OPTIONS
from tandem_worker.server.worker_server import KV_IDLE_TIMEOUT_ENV

from .kv_pull import prefill_puller, prefill_request
from .procs import HOST, greedy, stop_all, wait_for, wait_healthy, worker
from .test_worker_in_process import fake_prefill

TOKEN_KV = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M's KV of one token in float32: 45 KiB


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--kv-idle-timeout", "0"], "--kv-idle-timeout"),
        (["--kv-idle-timeout", "-1"], "--kv-idle-timeout"),
        (["--kv-idle-timeout", "nan"], "--kv-idle-timeout"),
        (["--kv-send-backlog-total-bytes", "0"], "--kv-send-backlog-total-bytes"),
        (["--kv-send-backlog-total-bytes", "1.5"], "--kv-send-backlog-total-bytes"),
    ],
)
def test_bad_kv_knobs_are_argparse_errors(argv, flag, capsys):
    from tandem_worker.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["worker", "--role", "decode", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "Traceback" not in err


def test_kv_knobs_parse_with_their_defaults():
    from tandem_worker.cli import build_parser

    parse = build_parser().parse_args
    args = parse(["worker", "--role", "prefill"])
    # None: the environment, else 30 s, decides (`kv_idle_timeout`).
    assert (args.kv_idle_timeout, args.kv_send_backlog_total_bytes) == (None, 4 * 2**30)
    args = parse(
        ["worker", "--role", "prefill", "--kv-idle-timeout", "2.5", "--kv-send-backlog-total-bytes", "7"]
    )
    assert (args.kv_idle_timeout, args.kv_send_backlog_total_bytes) == (2.5, 7)


def test_the_idle_timeout_flag_wins_over_the_environment_and_travels_in_the_pull(tmp_path, monkeypatch):
    """A decode worker started with --kv-idle-timeout 2 (and 600 in its environment) names 2 s in
    its pull and gives up on a prefill worker that sends its handshake and then nothing, after 2 s;
    the failed pull counts as an aborted transfer, not in the byte and duration metrics."""
    monkeypatch.setenv(KV_IDLE_TIMEOUT_ENV, "600")  # the child inherits it
    pulls: list[wpb.PrefillRequest] = []
    cancelled = threading.Event()

    def stalled(request, context):
        pulls.append(request)
        context.add_callback(cancelled.set)
        yield encode_kv_chunk(wpb.KVChunk(layout=request.layout))
        cancelled.wait(60)

    d = worker("decode", "decode-idle-flag", tmp_path, "--kv-idle-timeout", "2")
    with fake_prefill(stalled, options=SERVER_KEEPALIVE_OPTIONS) as port:
        try:
            d.start()
            wait_healthy([d])
            req = wpb.WorkerGenerateRequest(
                request_id="stalled",
                prompt_token_ids=list(range(1, 100)),
                sampling=greedy(4),
                prefill_endpoint=f"{HOST}:{port}",
            )
            with pytest.raises(grpc.RpcError) as err:
                list(wgrpc.WorkerStub(d.channel).Generate(req, timeout=60))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            assert err.value.details() == f"prefill worker {HOST}:{port} stalled: no KV for 2 s"
            assert [p.kv_idle_timeout_s for p in pulls] == [2.0]
            m = d.metrics()
            assert m[("tandem_kv_transfers_total", (("direction", "received"), ("outcome", "aborted")))] == 1
            assert (
                m[("tandem_kv_transfers_total", (("direction", "received"), ("outcome", "completed")))] == 0
            )
            assert m[("tandem_kv_transfer_seconds_count", (("direction", "received"),))] == 0
            assert m[("tandem_kv_transfer_bytes_total", (("direction", "received"),))] == 0
        finally:
            stop_all([d])


def test_a_prefill_worker_shows_its_unsent_kv_and_refuses_pulls_past_its_total_limit(tmp_path):
    """--kv-send-backlog-total-bytes 1 MiB: a reader that stops after the handshake leaves more
    unsent, which `tandem_kv_send_backlog_bytes` shows, and the next pull is refused as busy. Once
    that reader goes, the gauge reads 0 and pulls are served. Only the served pull is in the byte
    and duration metrics; the other two are aborted transfers."""
    p = worker("prefill", "prefill-backlog-flag", tmp_path, "--kv-send-backlog-total-bytes", str(2**20))
    try:
        p.start()
        wait_healthy([p])
        stats = p.stats()
        # SmolLM2-135M's on a CPU: the layout a decode worker would present.
        layout = wpb.KVLayout(
            model_id=stats.model_id,
            dtype="float32",
            block_size=stats.block_size,
            num_layers=30,
            num_kv_heads=3,
            head_dim=64,
        )

        def request(rid: str, n: int) -> wpb.PrefillRequest:
            return prefill_request(layout, rid, n)

        def backlog() -> float:
            return p.metric("tandem_kv_send_backlog_bytes", role="prefill")

        def transfers(outcome: str) -> float:
            return p.metric("tandem_kv_transfers_total", direction="sent", outcome=outcome)

        assert ("tandem_kv_send_backlog_bytes", (("role", "prefill"),)) in p.metrics()
        assert backlog() == 0
        with prefill_puller(p.address) as pull:
            # 512 tokens: 22 MiB of KV, far more than gRPC's windows take from a reader that stops.
            hog = pull(request("hog", 512), timeout=120)
            next(hog)  # the handshake; then this reader reads no more
            wait_for(
                lambda: backlog() > 2**20, 120, "the gauge shows the KV piling up for the stopped reader"
            )
            with pytest.raises(grpc.RpcError) as err:
                list(pull(request("refused", 8), timeout=60))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert "KV wait for slow readers (the limit is 1 MiB)" in err.value.details()
            hog.cancel()
            wait_for(lambda: backlog() == 0, 30, "the gauge reads 0 once the reader is gone")
            assert list(pull(request("served", 8), timeout=60))[-1][0].last

        wait_for(lambda: transfers("completed") == 1, 10, "the served pull is counted")
        assert transfers("aborted") == 2  # the reader that left, and the refused pull
        assert p.metric("tandem_kv_transfer_seconds_count", direction="sent") == 1
        assert p.metric("tandem_kv_transfer_bytes_total", direction="sent") == 8 * TOKEN_KV
        # What gRPC took for the reader that stopped, before it left.
        assert p.metric("tandem_kv_transfer_aborted_bytes_total", direction="sent") > 0
    finally:
        stop_all([p])


def test_tandem_worker_passes_its_prefill_queue_bound_to_the_engine_loop(monkeypatch):
    """--max-queued-prefill-tokens reaches serve_worker (and so the EngineLoop); 0 by default."""
    from tandem_worker import cli
    from tandem_worker.server import worker_main

    seen: list[dict] = []
    monkeypatch.setattr(worker_main, "serve_worker", lambda *args, **kw: seen.append(kw) or 0)
    assert cli.main(["worker", "--role", "prefill", "--max-queued-prefill-tokens", "4096"]) == 0
    assert cli.main(["worker", "--role", "prefill"]) == 0
    assert [kw["max_queued_prefill_tokens"] for kw in seen] == [4096, 0]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["worker", "--max-queued-prefill-tokens", "-1"])
