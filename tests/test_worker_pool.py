"""The router's worker choice: pure decisions over the pool's view, no processes."""

from __future__ import annotations

import grpc
import pytest

from tandem_proto.v1 import worker_pb2 as wpb
from tandem_worker.server.worker_pool import WorkerInfo, WorkerPool, resolve


def info(addr: str, role: str, free_blocks: int = 100, queued: int = 0, draining: bool = False) -> WorkerInfo:
    w = WorkerInfo(addr, grpc.insecure_channel(addr), healthy=True)
    w.stats = wpb.StatsResponse(
        role=role, free_blocks=free_blocks, block_size=16, queued_prompt_tokens=queued, draining=draining
    )
    return w


@pytest.fixture
def pool() -> WorkerPool:
    p = WorkerPool(decode_targets=["d1:1", "d2:1"], prefill_targets=["p1:1", "p2:1"])
    p._workers = {
        "d1:1": info("d1:1", "decode", free_blocks=10),
        "d2:1": info("d2:1", "decode", free_blocks=50),
        "p1:1": info("p1:1", "prefill", queued=900),
        "p2:1": info("p2:1", "prefill", queued=100),
    }
    p._decode, p._prefill = ["d1:1", "d2:1"], ["p1:1", "p2:1"]
    return p


def test_picks_roomiest_decode_and_least_loaded_prefill(pool):
    pair = pool.pick(prompt_tokens=100, exclude=set())
    assert pair.decode.address == "d2:1" and pair.prefill.address == "p2:1"


def test_adapter_residency_beats_room_and_queue(pool):
    """A pair already holding the adapter wins over a roomier, idler one; device beats host memory."""
    pool._workers["d1:1"].stats.adapters_host.append("sql")
    pool._workers["p1:1"].stats.adapters_device.append("sql")
    pair = pool.pick(100, set(), adapter="sql")
    assert pair.decode.address == "d1:1" and pair.prefill.address == "p1:1"
    pool._workers["d2:1"].stats.adapters_device.append("sql")
    assert pool.pick(100, set(), adapter="sql").decode.address == "d2:1"
    # Nobody holds it: plain load balancing; no adapter: residency is ignored.
    pair = pool.pick(100, set(), adapter="other")
    assert pair.decode.address == "d2:1" and pair.prefill.address == "p2:1"
    assert pool.pick(100, set()).prefill.address == "p2:1"
    assert pool.adapters() == ["sql"]
    # Residency never overrides room: a holder without KV room for the prompt (d1: 160 tokens) is skipped.
    del pool._workers["d2:1"].stats.adapters_device[:]
    assert pool.pick(100, set(), adapter="sql").decode.address == "d1:1"
    assert pool.pick(200, set(), adapter="sql").decode.address == "d2:1"


def test_router_side_pending_load_counts_until_the_next_stats(pool):
    pool.begin(pool.pick(100, set()), prompt_tokens=1000)
    pair = pool.pick(100, set())
    assert pair.prefill.address == "p1:1", "p2 now has 1,100 queued tokens by our own count"


def test_decode_without_room_is_skipped_and_none_when_nobody_fits(pool):
    assert pool.pick(prompt_tokens=300, exclude=set()).decode.address == "d2:1"
    assert not pool.all_full(300, set())
    assert pool.pick(prompt_tokens=900, exclude=set()) is None
    assert pool.all_full(900, set()), "busy, not broken: the router answers RESOURCE_EXHAUSTED"


def test_no_healthy_decode_is_not_full_but_unavailable(pool):
    for a in ("d1:1", "d2:1"):
        pool.mark_failed(pool._workers[a], "down")
    assert pool.pick(10, set()) is None and not pool.all_full(10, set())


def test_excluded_failed_and_draining_workers_are_not_picked(pool):
    assert pool.pick(100, exclude={"d2:1"}).decode.address == "d1:1"
    pool.mark_failed(pool._workers["p2:1"], "boom")
    assert pool.pick(100, set()).prefill.address == "p1:1"
    pool._workers["p1:1"].stats.draining = True
    assert pool.pick(100, set()) is None, "no eligible prefill worker"


def test_colocated_worker_needs_no_prefill_partner():
    p = WorkerPool(decode_targets=["c:1"])
    p._workers = {"c:1": info("c:1", "colocated")}
    p._decode = ["c:1"]
    pair = p.pick(10, set())
    assert pair.decode.address == "c:1" and pair.prefill is None


def test_resolve_static_and_dns_targets():
    assert resolve("10.0.0.7:5000") == ["10.0.0.7:5000"]
    addrs = resolve("dns:localhost:5000")
    assert "127.0.0.1:5000" in addrs
    assert resolve("dns:no-such-host.invalid:5000") == []
