"""A request the OpenAI or KServe frontend forwards, whose client ends it before the router's handler
begins, still counts once in `tandem_requests_total` (see `server/handoff.py`). CI saw a KServe
`timeout` of 1 µs counted nowhere: gRPC drops a call that is cancelled or past its deadline before
a handler thread reads it, and the router never hears of it.

In-process and without timing races: the router's gRPC server has one handler thread, which the
test holds, so a forwarded request waits until its deadline passes and is dropped, as under load."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import pytest
from tritonclient.grpc import service_pb2 as kpb

from tandem_worker.server.handoff import METADATA_KEY, Handoffs
from tests.frontends.conftest import in_process_frontends, registry_counted, registry_outcomes

MODEL = "smol"
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def stack(model_dir) -> Iterator[SimpleNamespace]:
    with in_process_frontends(model_dir, router_threads=1) as f:
        yield f


def _with_router_busy(stack, send) -> dict[str, float]:
    """Run `send` while the router's only handler thread is held; once released and every handler
    queued meanwhile has had its turn, what was counted."""
    before = registry_outcomes()
    release = threading.Event()
    stack.executor.submit(release.wait)
    try:
        send()
    finally:
        release.set()
    stack.executor.submit(lambda: None).result(timeout=30)  # the queue ran: late handlers had their turn
    return registry_counted(before)


def _kserve_request(timeout_us: int) -> kpb.ModelInferRequest:
    r = kpb.ModelInferRequest(model_name=MODEL, id="r")
    r.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hello")
    sp = r.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    sp.contents.bytes_contents.append(json.dumps({"max_tokens": 1}).encode())
    r.parameters["timeout"].int64_param = timeout_us
    return r


def test_a_kserve_request_past_its_timeout_before_the_router_took_it_counts_once_as_timed_out(stack):
    def send():
        with pytest.raises(grpc.RpcError) as ei:
            stack.kserve.ModelInfer(_kserve_request(200_000), timeout=30)
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    assert _with_router_busy(stack, send) == {"timed_out": 1.0}


def test_an_http_request_past_its_timeout_before_the_router_took_it_counts_once_as_timed_out(stack):
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 1}).encode()

    def send():
        with socket.create_connection((HOST, stack.http_port), timeout=30) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Request-Timeout: 0.2\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.split(b" ", 2)[1] == b"504", reply

    assert _with_router_busy(stack, send) == {"timed_out": 1.0}


def test_a_forwarded_request_the_router_took_counts_once_by_the_router(stack):
    # No workers: the router answers UNAVAILABLE and counts `failed`; the frontend counts nothing.
    before, held = registry_outcomes(), stack.service.handoffs.pending()
    with pytest.raises(grpc.RpcError) as ei:
        stack.kserve.ModelInfer(_kserve_request(0), timeout=30)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert registry_counted(before) == {"failed": 1.0}
    assert stack.service.handoffs.pending() == held  # nothing kept for a call settled after it began


# --- either order, directly ---------------------------------------------------------------------


class _Context:
    def __init__(self, token: str | None) -> None:
        self.token = token

    def invocation_metadata(self):
        return [(METADATA_KEY, self.token)] if self.token else []


def test_a_handler_that_begins_after_the_frontend_counted_counts_nothing_and_the_reverse_too():
    counted: list[grpc.StatusCode] = []
    h = Handoffs(lambda arrival, code: counted.append(code))

    late = h.new()
    h.settle(late, grpc.StatusCode.CANCELLED)
    assert counted == [grpc.StatusCode.CANCELLED]
    assert h.begin(_Context(late.token)) is False  # already counted: the handler must not
    assert h.pending() == 0

    taken = h.new()
    assert h.begin(_Context(taken.token)) is True
    h.settle(taken, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert counted == [grpc.StatusCode.CANCELLED]  # the router counts this one
    assert h.pending() == 0

    assert h.begin(_Context(None)) is True  # a direct client: always the router's to count
    assert h.pending() == 0


def test_tokens_the_frontend_counted_are_forgotten_in_time_and_past_a_bound(monkeypatch):
    from tandem_worker.server import handoff

    counted: list[grpc.StatusCode] = []
    now = [0.0]
    h = Handoffs(lambda arrival, code: counted.append(code), clock=lambda: now[0])
    monkeypatch.setattr(handoff, "MAX_SETTLED", 3)
    for _ in range(5):
        h.settle(h.new(), grpc.StatusCode.DEADLINE_EXCEEDED)
    assert len(counted) == 5 and h.pending() == 3  # counted, each once; the oldest two forgotten
    now[0] += handoff.FORGET_AFTER_SECONDS + 1
    h.settle(h.new(), grpc.StatusCode.CANCELLED)
    assert h.pending() == 1  # the old ones are gone, the new one kept
