"""The wire contracts: generated code is fresh, messages round-trip, services have the right shapes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tandem_proto.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


def _generate(proto_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(proto_dir / "generate.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _check(proto_dir: Path) -> subprocess.CompletedProcess[str]:
    return _generate(proto_dir, "--check")


def test_committed_generated_code_is_fresh():
    r = _check(REPO / "proto")
    assert r.returncode == 0, r.stderr


def test_check_fails_when_a_proto_changes_without_regenerating(tmp_path):
    copy = tmp_path / "proto"
    shutil.copytree(REPO / "proto", copy, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    src = copy / "tandem" / "v1" / "inference.proto"
    src.write_text(
        src.read_text().replace("string adapter = 6;", "string adapter = 6;\n  string tenant = 42;")
    )
    r = _check(copy)
    assert r.returncode == 1 and "inference_pb2.py" in r.stderr
    assert "worker_pb2.py" not in r.stderr  # only what changed is listed


def test_generation_is_deterministic(tmp_path):
    for name in ("a", "b"):
        r = _generate(REPO / "proto", "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
    a, b = (
        {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
        for d in (tmp_path / "a", tmp_path / "b")
    )
    assert len(a) == 8  # 2 x (_pb2.py, _pb2.pyi, _pb2_grpc.py) + 2 __init__.py
    assert a == b


def test_generated_imports_resolve_inside_tandem_proto():
    gen = REPO / "proto" / "src" / "tandem_proto" / "v1"
    for f in sorted(gen.glob("*_pb2*")):
        assert "from tandem.v1 import" not in f.read_text(encoding="utf-8"), f.name
    # worker.proto's SamplingParams field is inference_pb2's class, loaded once under tandem_proto.v1.
    field = worker_pb2.WorkerGenerateRequest.DESCRIPTOR.fields_by_name["sampling"]
    assert field.message_type is inference_pb2.SamplingParams.DESCRIPTOR
    assert worker_pb2.WorkerGenerateRequest(sampling={"max_tokens": 3}).sampling.max_tokens == 3
    assert inference_pb2.DESCRIPTOR.package == worker_pb2.DESCRIPTOR.package == "tandem.v1"


def test_generate_request_round_trips_with_optional_presence():
    req = inference_pb2.GenerateRequest(request_id="r1", adapter="a")
    req.chat.messages.add(role="user", content="Grüß dich 👋")
    req.sampling.max_tokens = 5
    req.sampling.stop.append("\n")
    back = inference_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back == req and back.WhichOneof("prompt") == "chat"
    assert back.sampling.HasField("max_tokens") and not back.sampling.HasField("temperature")
    assert back.sampling.temperature == 0.0  # the unset default reads as 0; presence tells them apart

    # An explicit 0 (greedy) survives the wire as "set", unlike the unset default above.
    req.sampling.temperature = 0.0
    req.sampling.top_k = 4
    req.sampling.seed = 2**63
    back = inference_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back == req and back.sampling.HasField("temperature") and back.sampling.temperature == 0.0
    assert back.sampling.seed == 2**63 and list(back.sampling.stop) == ["\n"]
    assert [m.content for m in back.chat.messages] == ["Grüß dich 👋"]


def test_kv_chunk_carries_a_mebibyte_of_payload():
    payload = bytes(range(256)) * 4096
    chunk = worker_pb2.KVChunk(layer=3, token_start=16, num_tokens=8, key=payload, value=payload[::-1])
    back = worker_pb2.KVChunk.FromString(chunk.SerializeToString())
    assert back.key == payload and back.value == payload[::-1] and back.layer == 3


def test_service_shapes():
    def method(pb, service, name):
        return pb.DESCRIPTOR.services_by_name[service].methods_by_name[name]

    for pb, service, name, streaming in [
        (inference_pb2, "Inference", "Generate", True),
        (inference_pb2, "Inference", "ListModels", False),
        (worker_pb2, "Worker", "Generate", True),
        (worker_pb2, "KVTransfer", "Prefill", True),
        (worker_pb2, "Admin", "Stats", False),
        (worker_pb2, "Admin", "Drain", False),
        (worker_pb2, "Admin", "LoadAdapter", False),
        (worker_pb2, "Admin", "UnloadAdapter", False),
        (worker_pb2, "Admin", "ListAdapters", False),
    ]:
        m = method(pb, service, name)
        assert m.server_streaming is streaming and not m.client_streaming, (service, name)
        assert m.full_name == f"tandem.v1.{service}.{name}"
    assert sorted(inference_pb2.DESCRIPTOR.services_by_name) == ["Inference"]
    assert sorted(worker_pb2.DESCRIPTOR.services_by_name) == ["Admin", "KVTransfer", "Worker"]
    admin = sorted(worker_pb2.DESCRIPTOR.services_by_name["Admin"].methods_by_name)
    assert admin == ["Drain", "ListAdapters", "LoadAdapter", "Stats", "UnloadAdapter"]
    # The gRPC stubs and servicers exist for every service.
    for grpc_mod, service in [
        (inference_pb2_grpc, "Inference"),
        (worker_pb2_grpc, "Worker"),
        (worker_pb2_grpc, "KVTransfer"),
        (worker_pb2_grpc, "Admin"),
    ]:
        assert hasattr(grpc_mod, f"{service}Stub") and hasattr(grpc_mod, f"add_{service}Servicer_to_server")


def test_sampling_params_survive_the_wire_whole():
    # Every field set away from its default: one that params_to_pb or params_from_pb forgets is a
    # setting the workers silently never see.
    import dataclasses

    from tandem_worker.engine.sampling_params import SamplingParams
    from tandem_worker.server.convert import params_from_pb, params_to_pb

    p = SamplingParams(
        max_tokens=40,
        temperature=0.5,
        top_p=0.75,
        top_k=7,
        seed=2**63 + 5,
        stop=["\n\n", "END"],
        stop_token_ids=[2, 9],
        ignore_eos=True,
        logprobs=True,
        top_logprobs=3,
        fit_max_tokens=True,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.25,
        min_p=0.125,
        logit_bias={5: -100.0, 7: 2.5},
        min_tokens=12,
        structured_outputs={"json": {"type": "object", "properties": {"b": {}, "a": {}}}},
        prompt_logprobs=3,
    )
    defaults = SamplingParams()
    unset = [f.name for f in dataclasses.fields(p) if getattr(p, f.name) == getattr(defaults, f.name)]
    assert not unset, f"set these away from their defaults too: {unset}"
    assert params_from_pb(params_to_pb(p)) == p
    # A prefill worker's view (its first token only): the EOS ban still holds for that token.
    first = params_from_pb(params_to_pb(p), max_tokens=1)
    assert (first.max_tokens, first.min_tokens) == (1, 1)
    # Each structured-output kind (a oneof on the wire).
    for so in ({"regex": "a+"}, {"choice": ["x", "y z"]}, {"grammar": 'start: "x"'}, {"json_object": True}):
        q = SamplingParams(structured_outputs=so)
        assert params_from_pb(params_to_pb(q)) == q
