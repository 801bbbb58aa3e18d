"""The wire contracts: generated code is fresh, messages round-trip, services have the right shapes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tandem_proto.v1 import inference_pb2, worker_pb2

REPO = Path(__file__).resolve().parents[1]


def _check(proto_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(proto_dir / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )


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


def test_generate_request_round_trips_with_optional_presence():
    req = inference_pb2.GenerateRequest(request_id="r1", adapter="a")
    req.chat.messages.add(role="user", content="Grüß dich 👋")
    req.sampling.max_tokens = 5
    req.sampling.stop.append("\n")
    back = inference_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back == req and back.WhichOneof("prompt") == "chat"
    assert back.sampling.HasField("max_tokens") and not back.sampling.HasField("temperature")


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
    ]:
        m = method(pb, service, name)
        assert m.server_streaming is streaming and not m.client_streaming, (service, name)
