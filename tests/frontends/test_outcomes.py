"""Every request counts in exactly one outcome of the router's `tandem_requests_total`, also one its
client ends: cancelled (over gRPC, by closing the HTTP connection or the KServe stream) or past the
deadline it set (gRPC's, `X-Request-Timeout`, KServe's `timeout` parameter or call deadline). Such a
request counts as the SLO miss it had already made, else as `cancelled` or `timed_out`; before,
it counted in no outcome at all, so attainment was computed over the requests that survived.

Three routers over the session's workers tell the cases apart without timing anything: `patient`
(SLOs no request can miss), `late_ttft` (a TTFT SLO every request misses) and `late_tpot` (a TPOT SLO
every request that streamed a token misses).

Also here: a seed of -1 is no seed in the OpenAI and KServe frontends, as vLLM reads it."""

from __future__ import annotations

import http.client
import json
import queue
import socket
from types import SimpleNamespace

import grpc
import numpy as np
import openai
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tandem_worker.server.pb import inference_pb2_grpc as pbgrpc
from tests.frontends.conftest import SERVED, frontend_router, serving
from tests.serving.procs import (
    HOST,
    Proc,
    assert_idle,
    greedy,
    request,
    router,
    wait_for,
)

PROMPT = "Once upon a time"
LONG = 2000  # tokens: far more than any deadline here lets it generate
# A direct client's deadline that ends before any first token (100+ ms here) yet leaves the call time
# to reach the router's handler: gRPC drops a call past its deadline before a handler thread reads
# it, and the router, never hearing of it, cannot count it (the frontends' calls are counted either
# way: server/handoff.py). 1 ms left that to a loaded machine's scheduling.
BEFORE_ANY_TOKEN = 0.02


@pytest.fixture(scope="module")
def routers(deployment):
    log, d0, p0 = deployment.log_dir, deployment.d0, deployment.p0
    patient, http, kserve = frontend_router(
        "outcomes-patient", log, d0, p0, "--slo-ttft-ms", "1e9", "--slo-tpot-ms", "1e9"
    )
    late_ttft = router("outcomes-late-ttft", log, [d0], [p0], "--slo-ttft-ms", "1e-6")
    late_tpot = router("outcomes-late-tpot", log, [d0], [p0], "--slo-ttft-ms", "1e9", "--slo-tpot-ms", "1e-6")
    procs = [patient, late_ttft, late_tpot]
    with serving(procs, routers=procs):
        yield SimpleNamespace(
            patient=patient,
            late_ttft=late_ttft,
            late_tpot=late_tpot,
            http=http,
            kserve=kserve,
            workers=deployment.workers,
            d0=d0,
        )


def outcomes(r: Proc) -> dict[str, float]:
    return {
        dict(labels)["outcome"]: value
        for (name, labels), value in r.metrics().items()
        if name == "tandem_requests_total"
    }


def counted(r: Proc, before: dict[str, float]) -> dict[str, float]:
    after = outcomes(r)
    return {o: n - before.get(o, 0.0) for o, n in after.items() if n != before.get(o, 0.0)}


def assert_counted_once(r: Proc, before: dict[str, float], outcome: str, workers) -> None:
    """The request ends up in `outcome`, and in nothing else, once the workers are done with it."""
    wait_for(lambda: counted(r, before), 30, f"{r.name} counts the request")
    assert_idle(workers, timeout=20)
    assert counted(r, before) == {outcome: 1.0}


def _grpc_cancel_after_first_message(r: Proc) -> None:
    call = pbgrpc.InferenceStub(r.channel).Generate(request(PROMPT, greedy(LONG)), timeout=120)
    assert next(call).token_ids  # generating
    call.cancel()


def _grpc_past_deadline(r: Proc, seconds: float) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        for _ in pbgrpc.InferenceStub(r.channel).Generate(request(PROMPT, greedy(LONG)), timeout=seconds):
            pass
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_grpc_stream_its_client_cancels_counts_once_as_cancelled(routers):
    before = outcomes(routers.patient)
    _grpc_cancel_after_first_message(routers.patient)
    assert_counted_once(routers.patient, before, "cancelled", routers.workers)


@pytest.mark.parametrize("seconds", [BEFORE_ANY_TOKEN, 1.0])  # before the first token, and while streaming
def test_a_grpc_deadline_counts_once_as_timed_out(routers, seconds):
    before = outcomes(routers.patient)
    _grpc_past_deadline(routers.patient, seconds)
    assert_counted_once(routers.patient, before, "timed_out", routers.workers)


@pytest.mark.parametrize("stream", [True, False])
def test_an_http_client_that_disconnects_counts_once_as_cancelled(routers, stream):
    before = outcomes(routers.patient)
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": stream}
    conn = http.client.HTTPConnection(HOST, int(routers.http.rsplit(":", 1)[1]), timeout=60)
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.fp.readline()  # the first event has arrived: it runs
    else:
        wait_for(lambda: routers.d0.stats().in_flight == 1, 60, "the request runs")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert_counted_once(routers.patient, before, "cancelled", routers.workers)


@pytest.mark.parametrize("seconds", ["0.001", "1"])
def test_an_http_request_timeout_is_504_and_counts_once_as_timed_out(routers, seconds):
    before = outcomes(routers.patient)
    with openai.OpenAI(base_url=routers.http + "/v1", api_key="x", max_retries=0, timeout=120) as c:
        with pytest.raises(openai.APIStatusError) as ei:
            c.completions.create(
                model=SERVED,
                prompt=PROMPT,
                max_tokens=LONG,
                extra_body={"ignore_eos": True},
                extra_headers={"X-Request-Timeout": seconds},
            )
    assert ei.value.status_code == 504
    assert_counted_once(routers.patient, before, "timed_out", routers.workers)


def _kserve_inputs() -> list[tc.InferInput]:
    text = tc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_))
    sp = tc.InferInput("sampling_parameters", [1], "BYTES")
    sp.set_data_from_numpy(
        np.array([json.dumps({"max_tokens": LONG, "ignore_eos": True}).encode()], dtype=np.object_)
    )
    return [text, sp]


@pytest.mark.parametrize(
    "deadline",
    [{"timeout": 1}, {"timeout": 1_000_000}, {"client_timeout": 1.0}],  # µs parameter; call deadline
    ids=["timeout-1us", "timeout-1s", "call-deadline-1s"],
)
def test_a_kserve_deadline_counts_once_as_timed_out(routers, deadline):
    before = outcomes(routers.patient)
    with tc.InferenceServerClient(routers.kserve) as client:
        with pytest.raises(InferenceServerException) as ei:
            client.infer(SERVED, _kserve_inputs(), **deadline)
    assert "DEADLINE_EXCEEDED" in ei.value.status()
    assert_counted_once(routers.patient, before, "timed_out", routers.workers)


def test_a_kserve_stream_closed_mid_generation_counts_once_as_cancelled(routers):
    before = outcomes(routers.patient)
    got: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(routers.kserve) as client:
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        stream = tc.InferInput("stream", [1], "BOOL")
        stream.set_data_from_numpy(np.array([True]))
        client.async_stream_infer(SERVED, [*_kserve_inputs(), stream], request_id="long")
        result, error = got.get(timeout=120)
        assert error is None and result.as_numpy("text_output") is not None  # generating
        client.stop_stream(cancel_requests=True)
    assert_counted_once(routers.patient, before, "cancelled", routers.workers)


def test_a_request_ended_after_its_ttft_slo_passed_counts_as_a_ttft_miss(routers):
    # Not "cancelled": the client that gave up on a late answer is the miss that matters most.
    r = routers.late_ttft
    before = outcomes(r)
    _grpc_cancel_after_first_message(r)
    assert_counted_once(r, before, "missed_ttft", routers.workers)
    before = outcomes(r)
    _grpc_past_deadline(r, BEFORE_ANY_TOKEN)  # no first token at all: it waited past the SLO for one
    assert_counted_once(r, before, "missed_ttft", routers.workers)


def test_a_request_ended_while_its_tokens_came_slower_than_the_tpot_slo_counts_as_a_tpot_miss(routers):
    r = routers.late_tpot
    before = outcomes(r)
    _grpc_cancel_after_first_message(r)
    assert_counted_once(r, before, "missed_tpot", routers.workers)
    before = outcomes(r)
    _grpc_past_deadline(r, BEFORE_ANY_TOKEN)  # no token yet, and the TTFT SLO not passed: only timed out
    assert_counted_once(r, before, "timed_out", routers.workers)


# --- seeds -------------------------------------------------------------------------------------


def test_a_seed_of_minus_one_is_no_seed_and_other_negative_seeds_their_twos_complement(model_dir):
    """vLLM reads -1 as no seed (and llama.cpp as a random one): their clients send it to sample at
    random, and got one fixed seed (2^64 - 1) for every request here."""
    from tritonclient.grpc import service_pb2 as kpb

    from tandem_worker.engine.tokenizer import Tokenizer
    from tandem_worker.server.kserve import BadRequest, KServeService
    from tandem_worker.server.openai_http import ApiError, OpenAIFrontend

    fe = OpenAIFrontend("127.0.0.1:1", SERVED, 8192, Tokenizer(model_dir), lambda: [], lambda: True)
    svc = KServeService("127.0.0.1:1", SERVED, 8192, adapters=lambda: [], ready=lambda: True)
    try:

        def openai_sampling(seed):
            return fe.parse({"prompt": PROMPT, "max_tokens": 2, "seed": seed}, False, {}).request.sampling

        def kserve_sampling(**sp):
            r = kpb.ModelInferRequest(model_name=SERVED)
            for name, val in (
                ("text_input", PROMPT.encode()),
                ("sampling_parameters", json.dumps(sp).encode()),
            ):
                r.inputs.add(name=name, datatype="BYTES", shape=[1]).contents.bytes_contents.append(val)
            return svc.translate(r).request.sampling

        for sampling in (openai_sampling(-1), kserve_sampling(seed=-1)):
            assert not sampling.HasField("seed")
        for sampling in (openai_sampling(-2), kserve_sampling(seed=-2)):
            assert sampling.seed == 2**64 - 2
        assert openai_sampling(2**64 - 1).seed == 2**64 - 1  # the unsigned spelling stays a seed
        assert openai_sampling(0).HasField("seed")
        with pytest.raises(ApiError) as ei:
            openai_sampling(-(2**63) - 1)
        assert ei.value.param == "seed"
        with pytest.raises(BadRequest, match="seed: must be in"):
            kserve_sampling(seed=-(2**63) - 1)
    finally:
        fe.close()
        svc.close()


def test_requests_with_a_seed_of_minus_one_sample_at_random(routers):
    with openai.OpenAI(base_url=routers.http + "/v1", api_key="x", max_retries=0, timeout=120) as c:

        def text(seed: int) -> str:
            return (
                c.completions.create(model=SERVED, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed)
                .choices[0]
                .text
            )

        assert text(-2) == text(2**64 - 2)  # one seed, spelt signed and unsigned
        # Three samples of 16 tokens at temperature 1 all alike: only if the seed were fixed.
        assert len({text(-1) for _ in range(3)}) > 1
