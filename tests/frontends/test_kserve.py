"""KServe's Open Inference Protocol v2 over gRPC on a real router, through Triton's own client
(`tritonclient.grpc`): health, metadata, infer and decoupled stream infer with the tensor names of
Triton's LLM backends, adapters by model name, and errors."""

from __future__ import annotations

import json
import queue
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from tandem_proto.v1 import inference_pb2 as pb
from tests.frontends.conftest import ADAPTER, SERVED
from tests.serving.procs import assert_idle, generate, greedy, request
from tests.serving.procs import sampling as wire_sampling

PROMPT = "Once upon a time, in a land far away,"


@pytest.fixture(scope="module")
def client(deployment):
    c = tc.InferenceServerClient(deployment.kserve)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ref(deployment):
    return generate(deployment.router, request(PROMPT, greedy(16)))


def text_input(prompt: str = PROMPT) -> tc.InferInput:
    t = tc.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    return t


def tensor(name: str, value, datatype: str) -> tc.InferInput:
    t = tc.InferInput(name, [1], datatype)
    t.set_data_from_numpy(
        np.array([value], dtype=np.object_ if datatype == "BYTES" else None).astype(
            {
                "BOOL": np.bool_,
                "INT32": np.int32,
                "FP32": np.float32,
                "UINT64": np.uint64,
                "BYTES": np.object_,
            }[datatype]
        )
    )
    return t


def sampling(**kw) -> tc.InferInput:
    return tensor("sampling_parameters", json.dumps(kw).encode(), "BYTES")


GREEDY = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}


def text_of(result) -> str:
    return b"".join(result.as_numpy("text_output").ravel()).decode()


def test_health(client, deployment):
    assert client.is_server_live() and client.is_server_ready()
    # Its own gRPC health service and server reflection (grpcurl works against the KServe port).
    with grpc.insecure_channel(deployment.kserve) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {s.name for s in next(replies).list_services_response.service}
    assert "inference.GRPCInferenceService" in services
    assert client.is_model_ready(SERVED) and client.is_model_ready(ADAPTER)
    assert not client.is_model_ready("no-such-model")


def test_metadata(client):
    md = client.get_server_metadata()
    assert md.name == "tandem"
    mm = client.get_model_metadata(SERVED)
    inputs = {t.name: t.datatype for t in mm.inputs}
    assert inputs["text_input"] == "BYTES" and inputs["stream"] == "BOOL"
    assert inputs["sampling_parameters"] == "BYTES" and inputs["max_tokens"] == "INT32"
    assert {t.name: t.datatype for t in mm.outputs}["text_output"] == "BYTES"
    assert client.get_model_config(SERVED).config.model_transaction_policy.decoupled
    with pytest.raises(InferenceServerException) as ei:
        client.get_model_metadata("no-such-model")
    assert "NOT_FOUND" in ei.value.status()


def test_infer_equals_grpc(client, ref, deployment):
    r = client.infer(SERVED, [text_input(), sampling(**GREEDY)], request_id="req-1")
    assert text_of(r) == ref.text and ref.text
    assert r.get_response().id == "req-1"
    # Clients' request ids need not be unique: two clients both sending id "1" at once both succeed.
    clients = [tc.InferenceServerClient(deployment.kserve) for _ in range(2)]
    with ThreadPoolExecutor(2) as ex:
        results = list(
            ex.map(lambda c: c.infer(SERVED, [text_input(), sampling(**GREEDY)], request_id="1"), clients)
        )
    assert [text_of(x) for x in results] == [ref.text, ref.text]
    for c in clients:
        c.close()


def test_infer_with_separate_tensors(client, ref):
    inputs = [
        text_input(),
        tensor("max_tokens", 16, "INT32"),
        tensor("temperature", 0.0, "FP32"),
        tensor("ignore_eos", True, "BOOL"),
        tensor("return_num_output_tokens", True, "BOOL"),
        tensor("return_finish_reason", True, "BOOL"),
    ]
    r = client.infer(SERVED, inputs)
    assert text_of(r) == ref.text
    assert int(r.as_numpy("num_output_tokens")[0]) == 16
    assert r.as_numpy("finish_reason")[0] == b"length"


def test_infer_with_prompt_in_output(client, ref):
    r = client.infer(
        SERVED, [text_input(), sampling(**GREEDY), tensor("exclude_input_in_output", False, "BOOL")]
    )
    assert text_of(r) == PROMPT + ref.text


def test_adapter_by_model_name(client, deployment):
    want = generate(deployment.router, request(PROMPT, greedy(16), adapter=ADAPTER))
    assert text_of(client.infer(ADAPTER, [text_input(), sampling(**GREEDY)])) == want.text


def _stream(client, requests: list[tuple[str, list, str]], timeout: float = 120.0, empty_final: bool = False):
    """Send each (model, inputs, id) on one stream; collect (results, errors) per id until all final."""
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for model, inputs, rid in requests:
            client.async_stream_infer(model, inputs, request_id=rid, enable_empty_final_response=empty_final)
        results: dict[str, list] = {rid: [] for _, _, rid in requests}
        errors: dict[str, str] = {}
        open_ids = set(results)
        while open_ids:
            result, error = got.get(timeout=timeout)
            if error is not None:
                rid = next(iter(open_ids)) if len(open_ids) == 1 else str(error)
                errors[rid] = str(error)
                open_ids.discard(rid)
                continue
            resp = result.get_response()
            results[resp.id].append(result)
            if resp.parameters["triton_final_response"].bool_param:
                open_ids.discard(resp.id)
        return results, errors
    finally:
        client.stop_stream()


def test_stream_infer_streams_deltas(client, ref):
    inputs = [text_input(), sampling(**GREEDY), tensor("stream", True, "BOOL")]
    results, errors = _stream(client, [(SERVED, inputs, "s-1")])
    assert not errors
    pieces = [text_of(r) for r in results["s-1"]]
    assert len([p for p in pieces if p]) >= 3, pieces
    assert "".join(pieces) == ref.text


def test_stream_infer_empty_final_response(client, ref):
    """With enable_empty_final_response (as Triton's decoupled clients ask), the last response carries
    no output, only the final flag; the text before it is complete."""
    inputs = [text_input(), sampling(**GREEDY), tensor("stream", True, "BOOL")]
    results, errors = _stream(client, [(SERVED, inputs, "s-2")], empty_final=True)
    assert not errors
    *pieces, last = results["s-2"]
    assert not last.get_response().outputs
    assert all(not r.get_response().parameters["triton_final_response"].bool_param for r in pieces)
    assert "".join(text_of(r) for r in pieces) == ref.text


def test_stream_infer_concurrent_requests_on_one_stream(client, ref, deployment):
    other = generate(deployment.router, request("The capital of France is", greedy(8)))
    results, errors = _stream(
        client,
        [
            (SERVED, [text_input(), sampling(**GREEDY), tensor("stream", True, "BOOL")], "a"),
            (
                SERVED,
                [
                    text_input("The capital of France is"),
                    sampling(max_tokens=8, temperature=0, ignore_eos=True),
                ],
                "b",
            ),
        ],
    )
    assert not errors
    assert "".join(text_of(r) for r in results["a"]) == ref.text
    assert len(results["b"]) == 1 and text_of(results["b"][0]) == other.text


def test_errors(client, deployment):
    invalid = deployment.router.metric("tandem_requests_total", outcome="invalid")
    with pytest.raises(InferenceServerException) as ei:
        client.infer(SERVED, [text_input(), tensor("max_tokenz", 4, "INT32")])
    assert "INVALID_ARGUMENT" in ei.value.status() and "max_tokenz" in ei.value.message()
    # Refused by the frontend, which the router never saw: counted all the same.
    assert deployment.router.metric("tandem_requests_total", outcome="invalid") == invalid + 1
    with pytest.raises(InferenceServerException) as ei:
        client.infer(SERVED, [text_input(), sampling(max_tokens=0)])
    assert "INVALID_ARGUMENT" in ei.value.status()
    with pytest.raises(InferenceServerException) as ei:
        client.infer("no-such-model", [text_input(), sampling(max_tokens=2)])
    assert "NOT_FOUND" in ei.value.status()
    with pytest.raises(InferenceServerException) as ei:  # token streaming needs ModelStreamInfer
        client.infer(SERVED, [text_input(), tensor("stream", True, "BOOL")])
    assert "INVALID_ARGUMENT" in ei.value.status()
    # On a stream, an error ends only that request and arrives through the callback.
    _, errors = _stream(client, [(SERVED, [text_input(), sampling(temperature=-1)], "bad")])
    assert "temperature" in errors["bad"]
    assert_idle(deployment.workers)


def test_cancelled_stream_and_deadline_free_the_workers(client, deployment):
    """Closing a stream mid-generation, or a deadline passing, cancels the request on the workers."""
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    long = [
        text_input(),
        sampling(max_tokens=2000, temperature=0, ignore_eos=True),
        tensor("stream", True, "BOOL"),
    ]
    client.async_stream_infer(SERVED, long, request_id="long")
    result, error = got.get(timeout=120)
    assert error is None and text_of(result)  # it is generating
    assert deployment.d0.stats().in_flight == 1
    client.stop_stream(cancel_requests=True)
    assert_idle(deployment.workers, timeout=20)
    with pytest.raises(InferenceServerException) as ei:
        client.infer(SERVED, [text_input(), sampling(max_tokens=2000, ignore_eos=True)], client_timeout=1.0)
    assert "DEADLINE_EXCEEDED" in ei.value.status()
    assert_idle(deployment.workers, timeout=20)


def test_sampling_parameters_take_each_value_as_its_own_type():
    # Nothing coerced into something else: "128" is not the token ids [1, 2, 8], a map not its
    # keys as stop strings, true not a temperature, "false" not true. Numeric strings are numbers
    # for every numeric key alike (Triton's vLLM backend documents them so).
    from tritonclient.grpc import service_pb2 as kpb

    from tandem_worker.server.kserve import BadRequest, KServeService

    svc = KServeService("127.0.0.1:1", "smol", 8192, adapters=lambda: [], ready=lambda: True)

    def sampling(**sp):
        r = kpb.ModelInferRequest(model_name="smol")
        for name, val in (("text_input", b"Hi"), ("sampling_parameters", json.dumps(sp).encode())):
            t = r.inputs.add(name=name, datatype="BYTES", shape=[1])
            t.contents.bytes_contents.append(val)
        return svc.translate(r).request.sampling

    for bad in (
        {"stop_token_ids": "128"},
        {"stop_token_ids": [True]},
        {"stop": {"foo": 1, "bar": 2}},
        {"temperature": True},
        {"temperature": "hot"},
        {"ignore_eos": "no"},
        {"ignore_eos": 1},
        {"max_tokens": 2.5},
    ):
        with pytest.raises(BadRequest, match="bad value"):
            sampling(**bad)
    s = sampling(
        max_tokens="16", temperature="0.7", top_k="5", ignore_eos="false", stop="x", stop_token_ids=[7, "8"]
    )
    assert (s.max_tokens, round(s.temperature, 3), s.top_k, s.ignore_eos) == (16, 0.7, 5, False)
    assert list(s.stop) == ["x"] and list(s.stop_token_ids) == [7, 8]
    assert sampling(ignore_eos=True, max_tokens=4.0).ignore_eos is True


def test_a_half_precision_tensor_in_typed_contents_is_a_clear_bad_request():
    # The protocol has no typed contents for FP16: such a value can only arrive as raw bytes.
    from tritonclient.grpc import service_pb2 as kpb

    from tandem_worker.server.kserve import BadRequest, KServeService

    svc = KServeService("127.0.0.1:1", "smol", 8192, adapters=lambda: [], ready=lambda: True)
    r = kpb.ModelInferRequest(model_name="smol")
    t = r.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(b"Hi")
    r.inputs.add(name="temperature", datatype="FP16", shape=[1])
    with pytest.raises(BadRequest, match="FP16 travels in raw_input_contents only"):
        svc.translate(r)


def test_request_parameters_set_sampling_as_sampling_parameters_do(client, ref):
    # The protocol's own request-level `parameters` map (tritonclient's `parameters=`), not a tensor.
    r = client.infer(
        SERVED, [text_input()], parameters={"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    )
    assert text_of(r) == ref.text and ref.text
    with pytest.raises(InferenceServerException) as ei:
        client.infer(SERVED, [text_input()], parameters={"max_tokenz": 4})
    assert "INVALID_ARGUMENT" in ei.value.status() and "max_tokenz" in ei.value.message()
    # A value out of the engine's range is the engine's refusal, by name.
    with pytest.raises(InferenceServerException) as ei:
        client.infer(SERVED, [text_input()], parameters={"presence_penalty": 2.5})
    assert "INVALID_ARGUMENT" in ei.value.status() and "presence_penalty" in ei.value.message()


def test_penalties_and_logit_bias_are_served_as_through_grpc(client, deployment):
    # Triton's LLM backends take penalties as tensors and in sampling_parameters, as vLLM's
    # SamplingParams the logit bias and min_p: all reach the engine.
    penalties = {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.25}
    plain = generate(deployment.router, request(PROMPT, greedy(16)))
    bias = {plain.token_ids[0]: -100.0}
    want = generate(deployment.router, request(PROMPT, greedy(16, **penalties, logit_bias=bias)))
    assert want.token_ids[0] != plain.token_ids[0]
    json_bias = {str(k): v for k, v in bias.items()}
    r = client.infer(SERVED, [text_input(), sampling(**GREEDY, **penalties, logit_bias=json_bias)])
    assert text_of(r) == want.text
    tensors = [tensor(k, v, "FP32") for k, v in penalties.items()]
    answer = client.infer(SERVED, [text_input(), sampling(**GREEDY, logit_bias=json_bias), *tensors])
    assert text_of(answer) == want.text
    seeded = {"max_tokens": 16, "temperature": 1.5, "seed": 11, "ignore_eos": True}
    want = generate(deployment.router, request(PROMPT, wire_sampling(**seeded, min_p=0.2)))
    assert text_of(client.infer(SERVED, [text_input(), sampling(**seeded, min_p=0.2)])) == want.text


def test_structured_outputs_are_served_as_through_grpc(client, deployment):
    # vLLM's request object in sampling_parameters, under Triton's vLLM backend's older key too, and
    # in the request's parameters map as JSON text; a bad one is INVALID_ARGUMENT, naming it.
    so = {"regex": " [a-z]+ [a-z]+\\."}
    want = generate(
        deployment.router,
        request(
            PROMPT,
            wire_sampling(max_tokens=12, temperature=0.0, structured_outputs=pb.StructuredOutputs(**so)),
        ),
    )
    assert want.finish_reason == pb.FINISH_REASON_STOP
    for key in ("structured_outputs", "guided_decoding"):
        r = client.infer(SERVED, [text_input(), sampling(max_tokens=12, temperature=0.0, **{key: so})])
        assert text_of(r) == want.text, key
    r = client.infer(
        SERVED,
        [text_input(), sampling(max_tokens=12, temperature=0.0)],
        parameters={"structured_outputs": json.dumps(so)},
    )
    assert text_of(r) == want.text
    with pytest.raises(InferenceServerException) as ei:
        client.infer(SERVED, [text_input(), sampling(structured_outputs={"regex": "([0-9]"})])
    assert "INVALID_ARGUMENT" in ei.value.status() and "unclosed group" in ei.value.message()


def test_the_timeout_parameter_is_the_deadline(client, deployment):
    # Triton's schedule-policy `timeout` (microseconds): 1 µs cannot be met.
    with pytest.raises(InferenceServerException) as ei:
        client.infer(SERVED, [text_input(), sampling(max_tokens=2000, ignore_eos=True)], timeout=1)
    assert "DEADLINE_EXCEEDED" in ei.value.status()
    assert_idle(deployment.workers, timeout=20)


def test_a_response_names_the_model_also_when_the_request_did_not(client, ref):
    r = client.infer("", [text_input(), sampling(**GREEDY)])
    assert text_of(r) == ref.text
    assert r.get_response().model_name == SERVED
    results, errors = _stream(
        client, [("", [text_input(), sampling(**GREEDY), tensor("stream", True, "BOOL")], "m")]
    )
    assert not errors and all(x.get_response().model_name == SERVED for x in results["m"])


def _service():
    from tandem_worker.server.kserve import KServeService

    return KServeService("127.0.0.1:1", "smol", 8192, adapters=lambda: [], ready=lambda: True)


def _request(params: dict | None = None, **tensors):
    """A ModelInferRequest: text_input "Hi", then `tensors` (name -> (datatype, value)) in typed
    contents, and `params` as the request's own parameters."""
    from tritonclient.grpc import service_pb2 as kpb

    from tandem_worker.server.kserve import CONTENTS

    r = kpb.ModelInferRequest(model_name="smol")
    t = r.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(b"Hi")
    for name, (dt, value) in tensors.items():
        t = r.inputs.add(name=name, datatype=dt, shape=[1])
        getattr(t.contents, CONTENTS[dt]).append(value)
    for key, value in (params or {}).items():
        if isinstance(value, bool):
            r.parameters[key].bool_param = value
        elif isinstance(value, int):
            r.parameters[key].int64_param = value
        elif isinstance(value, float):
            r.parameters[key].double_param = value
        else:
            r.parameters[key].string_param = value
    return r


def test_request_parameters_translate_with_the_checks_of_sampling_parameters():
    from tandem_worker.server.kserve import BadRequest

    svc = _service()
    t = svc.translate(
        _request(
            {
                "max_tokens": 7,
                "temperature": 0.5,
                "top_p": "0.9",
                "top_k": 3,
                "seed": 11,
                "stop": "\n\n",
                "stop_token_ids": 2,
                "ignore_eos": True,
                "repetition_penalty": 1.25,
                "presence_penalty": "0.5",
                "frequency_penalty": -0.25,
                "min_tokens": "3",
                # No-op values of what the engine lacks, and what Triton's clients send.
                "n": 1,
                "use_beam_search": False,
                "priority": 3,
                "sequence_id": 0,
                "triton_enable_empty_final_response": True,
                "timeout": 2_500_000,
            }
        )
    )
    s = t.request.sampling
    assert (s.max_tokens, s.temperature, round(s.top_p, 3), s.top_k, s.seed, s.ignore_eos) == (
        7,
        0.5,
        0.9,
        3,
        11,
        True,
    )
    assert list(s.stop) == ["\n\n"] and list(s.stop_token_ids) == [2]
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (1.25, 0.5, -0.25)
    assert s.min_tokens == 3
    assert t.timeout == 2.5
    for params, match in (
        ({"max_tokens": 0}, "parameters.max_tokens: must be >= 1"),
        ({"max_tokens": 2.5}, "parameters.max_tokens: bad value"),
        ({"temperature": True}, "parameters.temperature: bad value"),
        ({"ignore_eos": 1}, "parameters.ignore_eos: bad value"),
        ({"stop": 5}, "parameters.stop: bad value"),
        ({"n": 2}, "parameters.n: 2 is not supported"),
        ({"n": True}, "parameters.n: True is not supported"),  # a bool is not the count 1
        ({"presence_penalty": "much"}, "parameters.presence_penalty: bad value"),
        ({"logit_bias": '{"5": 1}'}, "parameters.logit_bias: bad value"),  # objects: sampling_parameters
        ({"use_beam_search": True}, "parameters.use_beam_search: True is not supported"),
        ({"sequence_id": 42}, "sequences"),
        ({"timeout": -1}, "parameters.timeout"),
        ({"headers": "x"}, "unknown request parameter 'headers'"),
        ({"triton_custom": True}, "unknown request parameter 'triton_custom'"),
    ):
        with pytest.raises(BadRequest, match=match):
            svc.translate(_request(params))


@pytest.mark.parametrize("bias", [{"x": 1}, {"5": "much"}, {"5": None}, [5], {"99999999999": 1}])
def test_a_bad_logit_bias_is_refused(bias):
    from tandem_worker.server.kserve import BadRequest

    sp = ("BYTES", json.dumps({"logit_bias": bias}).encode())
    with pytest.raises(BadRequest, match="sampling_parameters.logit_bias: bad value"):
        _service().translate(_request(sampling_parameters=sp))


def test_a_key_given_twice_must_agree():
    from tandem_worker.server.kserve import BadRequest

    svc = _service()
    sp = ("BYTES", json.dumps({"max_tokens": 9, "temperature": 0.7}).encode())
    with pytest.raises(BadRequest, match="conflicts"):
        svc.translate(_request(max_tokens=("INT32", 5), sampling_parameters=sp))
    with pytest.raises(BadRequest, match="conflicts"):
        svc.translate(_request({"max_tokens": 5}, sampling_parameters=sp))
    with pytest.raises(BadRequest, match="conflicts"):
        svc.translate(_request(seed=("UINT64", 1), random_seed=("UINT64", 2)))
    # The same value in two places is one value: 0.7 as FP32 and as JSON agree.
    s = svc.translate(
        _request({"max_tokens": 9}, temperature=("FP32", 0.7), sampling_parameters=sp)
    ).request.sampling
    assert s.max_tokens == 9 and round(s.temperature, 3) == 0.7
    # Stops from two places both apply.
    stops = ("BYTES", json.dumps({"stop": ["a"]}).encode())
    s = svc.translate(_request({"stop": "b"}, sampling_parameters=stops)).request.sampling
    assert sorted(s.stop) == ["a", "b"]


def test_malformed_tensors_are_a_bad_request():
    from tritonclient.grpc import service_pb2 as kpb

    from tandem_worker.server.kserve import BadRequest

    svc = _service()

    def raw(*tensors: tuple[str, str, list[int], bytes]) -> kpb.ModelInferRequest:
        r = kpb.ModelInferRequest(model_name="smol")
        for name, dt, shape, data in tensors:
            r.inputs.add(name=name, datatype=dt, shape=shape)
            r.raw_input_contents.append(data)
        return r

    prompt = ("text_input", "BYTES", [1], (2).to_bytes(4, "little") + b"Hi")
    cases = [
        # 3 bytes are no INT32 (numpy's ValueError escaped as an internal error).
        (raw(prompt, ("max_tokens", "INT32", [1], b"\x05\x00\x00")), "not whole INT32 elements"),
        # An element longer than the bytes that follow: never silently cut short.
        (raw(("text_input", "BYTES", [1], (100).to_bytes(4, "little") + b"Hi")), "runs past the end"),
        # The same input twice: which one would count?
        (
            raw(
                prompt,
                ("max_tokens", "INT32", [1], b"\x05\x00\x00\x00"),
                ("max_tokens", "INT32", [1], b"\x09\x00\x00\x00"),
            ),
            "given twice",
        ),
        # A yes/no input as a number: 2 or 0.5 is no answer.
        (raw(prompt, ("stream", "INT32", [1], b"\x02\x00\x00\x00")), "datatype must be BOOL"),
        (raw(prompt, ("exclude_input_in_output", "FP32", [1], b"\x00\x00\x00\x3f")), "datatype must be BOOL"),
        # A shape that does not describe the data.
        (raw(("text_input", "BYTES", [3, 2], (2).to_bytes(4, "little") + b"Hi")), "shape"),
        # Past what float32 holds: infinity, not the number asked for.
        (
            raw(prompt, ("temperature", "FP64", [1], np.array([1e39], "<f8").tobytes())),
            "temperature: bad value",
        ),
        # Past 64 bits a seed would be folded onto another one.
        (
            raw(prompt, ("sampling_parameters", "BYTES", [1], _bytes(json.dumps({"seed": 2**64})))),
            "seed: must be in",
        ),
        (raw(prompt, ("sampling_parameters", "BYTES", [1], _bytes("[" * 100_000))), "nested too deeply"),
    ]
    for req, match in cases:
        with pytest.raises(BadRequest, match=match):
            svc.translate(req)
    twice = raw(prompt)
    twice.outputs.add(name="text_output")
    twice.outputs.add(name="text_output")
    with pytest.raises(BadRequest, match="twice"):
        svc.translate(twice)


def _bytes(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(4, "little") + data
