"""Every request the OpenAI or KServe frontend refuses itself, before any call to the router, counts
once in `tandem_requests_total` (the router, which counts the rest, never sees these): `invalid`, as
each is the caller's mistake, whatever its status (400, 413, 501; NOT_FOUND for a model version that
does not exist). A request the frontend passes on counts once too, by the router alone.

In-process: both frontends over a real router (`RouterService`) on a loopback gRPC port, with no
workers, so a request that reaches it counts as `failed`; a refusal counted twice, or also passed
on, shows as a second outcome."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import pytest
from tritonclient.grpc import service_pb2 as kpb

from tandem_worker.server.openai_http import MAX_BODY_BYTES
from tests.frontends.conftest import in_process_frontends, registry_counted, registry_outcomes

MODEL = "smol"
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def frontends(model_dir) -> Iterator[SimpleNamespace]:
    with in_process_frontends(model_dir, router_threads=8) as f:
        yield f


# --- OpenAI HTTP ---------------------------------------------------------------------------------


def _post(port: int, head: bytes, body: bytes, path: bytes = b"/v1/completions") -> int:
    """One request written as given, on a connection of its own; the response's status."""
    with socket.create_connection((HOST, port), timeout=30) as s:
        s.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head + b"\r\n" + body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


VALID = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 1}).encode()
TOO_BIG = MAX_BODY_BYTES + 1


@pytest.mark.parametrize(
    ("head", "body", "status"),
    [
        # Refused from the header alone: the body is never read.
        (b"Content-Length: %d\r\n" % TOO_BIG, b"", 413),
        (b"Transfer-Encoding: chunked\r\n", b"%x\r\n" % TOO_BIG, 413),
        (b"Transfer-Encoding: gzip\r\nContent-Length: %d\r\n" % len(VALID), VALID, 501),
        (b"Content-Length: +%d\r\n" % len(VALID), VALID, 400),
        (b"Content-Length: 9\r\n", b'{"prompt"', 400),
        (b"Content-Length: 17\r\n", b'{"prompt": "Hi",}', 400),
    ],
    ids=["too-large", "too-large-chunked", "unsupported-coding", "bad-framing", "cut-json", "bad-json"],
)
def test_an_http_request_the_frontend_refuses_counts_once_as_invalid(frontends, head, body, status):
    before = registry_outcomes()
    assert _post(frontends.http_port, head, body) == status
    assert registry_counted(before) == {"invalid": 1.0}


def test_an_http_request_the_frontend_passes_on_counts_once_by_the_router(frontends):
    before = registry_outcomes()
    assert _post(frontends.http_port, b"Content-Length: %d\r\n" % len(VALID), VALID) == 503  # no workers
    assert registry_counted(before) == {"failed": 1.0}


def test_a_post_to_no_route_is_no_request(frontends):
    # Not an inference request at all (a probe, a wrong URL): counting it would swell `invalid`.
    before = registry_outcomes()
    assert _post(frontends.http_port, b"Content-Length: %d\r\n" % len(VALID), VALID, b"/v1/embeddings") == 404
    assert registry_counted(before) == {}


# --- KServe v2 gRPC -----------------------------------------------------------------------------


def _infer_request(version: str = "", stream: bool = False, extra: str = "") -> kpb.ModelInferRequest:
    r = kpb.ModelInferRequest(model_name=MODEL, model_version=version, id="r")
    r.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hello")
    sp = r.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    sp.contents.bytes_contents.append(json.dumps({"max_tokens": 1}).encode())
    if stream:
        r.inputs.add(name="stream", datatype="BOOL", shape=[1]).contents.bool_contents.append(True)
    if extra:  # a tensor this model does not take
        r.inputs.add(name=extra, datatype="INT32", shape=[1]).contents.int_contents.append(1)
    return r


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (_infer_request(stream=True), grpc.StatusCode.INVALID_ARGUMENT),  # streaming needs the stream call
        (_infer_request(version="2"), grpc.StatusCode.NOT_FOUND),
        (_infer_request(version="2", extra="max_tokenz"), grpc.StatusCode.NOT_FOUND),  # two faults, once
        (_infer_request(extra="max_tokenz"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["stream-on-unary", "no-such-version", "no-such-version-and-bad-tensor", "bad-tensor"],
)
def test_a_kserve_infer_the_frontend_refuses_counts_once_as_invalid(frontends, request_, code):
    before = registry_outcomes()
    with pytest.raises(grpc.RpcError) as ei:
        frontends.kserve.ModelInfer(request_, timeout=30)
    assert ei.value.code() == code, ei.value.details()
    assert registry_counted(before) == {"invalid": 1.0}


@pytest.mark.parametrize(
    "request_",
    [_infer_request(version="2", stream=True), _infer_request(extra="max_tokenz", stream=True)],
    ids=["no-such-version", "bad-tensor"],
)
def test_a_kserve_stream_request_the_frontend_refuses_counts_once_as_invalid(frontends, request_):
    before = registry_outcomes()
    (reply,) = list(frontends.kserve.ModelStreamInfer(iter([request_]), timeout=30))
    assert reply.error_message and reply.infer_response.id == "r"
    assert registry_counted(before) == {"invalid": 1.0}


def test_a_kserve_infer_the_frontend_passes_on_counts_once_by_the_router(frontends):
    before = registry_outcomes()
    with pytest.raises(grpc.RpcError) as ei:
        frontends.kserve.ModelInfer(_infer_request(), timeout=30)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE  # no workers
    assert registry_counted(before) == {"failed": 1.0}
    before = registry_outcomes()
    (reply,) = list(frontends.kserve.ModelStreamInfer(iter([_infer_request(stream=True)]), timeout=30))
    assert "UNAVAILABLE" in reply.error_message
    assert registry_counted(before) == {"failed": 1.0}
