"""The side-stream roles (engine/streams.py): one stream per role and device, and no other module
of ours drawing from torch's stream pool, where streams come back around every 32 draws."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tandem_worker.engine import streams

ROOT = Path(__file__).resolve().parents[2]


def test_only_the_stream_roles_draw_from_torchs_pool():
    # A stream taken per use (per KV transfer, per capture) would come round to the one CUDA graphs
    # are captured on, and a transfer's copies would be recorded into a graph.
    callers = [
        str(path.relative_to(ROOT))
        for folder in ("worker/src", "kernels/src")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if re.search(r"\bcuda\.Stream\(|\bStream\(device", path.read_text())
        and path != Path(streams.__file__).resolve()
    ]
    assert callers == [], f"use tandem_worker.engine.streams.side_stream, not torch.cuda.Stream: {callers}"


def test_each_role_gets_one_stream_per_device_for_the_whole_process(monkeypatch):
    made: list[int] = []

    def fake_stream(device: int) -> object:
        made.append(device)
        return object()

    monkeypatch.setattr(streams, "_streams", {})
    monkeypatch.setattr(torch.cuda, "Stream", fake_stream)
    lora = streams.side_stream("lora", "cuda:0")
    assert streams.side_stream("lora", torch.device("cuda", 0)) is lora
    assert streams.side_stream("lora", 0) is lora
    kv = streams.side_stream("kv-write", "cuda:0")
    other_gpu = streams.side_stream("lora", "cuda:1")
    assert len({id(lora), id(kv), id(other_gpu)}) == 3
    assert made == [0, 0, 1]  # one draw per (role, device), however many asked
    with pytest.raises(ValueError, match="unknown stream role 'kv'"):
        streams.side_stream("kv", "cuda:0")
    with pytest.raises(ValueError, match="CUDA streams"):
        streams.side_stream("lora", "cpu")
