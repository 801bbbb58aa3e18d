"""LoRA through real processes: prefill and decode workers apply the same adapter, the router pairs
workers by adapter residency, the admin service loads, lists and unloads adapters."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest

from tandem_proto.v1 import worker_pb2 as wpb
from tandem_proto.v1 import worker_pb2_grpc as wgrpc
from tests.engine.test_engine_vs_hf import assert_matches
from tests.lora.conftest import MAX_NEW, MIXED_SPECS
from tests.serving.procs import (
    assert_idle,
    generate,
    greedy,
    request,
    router,
    rpc_error,
    stop_all,
    wait_for,
    wait_healthy,
    worker,
)


@pytest.fixture(scope="module")
def lora_cluster(adapter_store, tmp_path_factory, model_dir):
    log = tmp_path_factory.mktemp("lora-serving-logs")
    # Besides the store, an adapter registered under another name the way the operator does it
    # (engine.json's "adapters" list, `--adapters-config`).
    config = log / "engine.json"
    config.write_text(
        json.dumps({"adapters": [{"name": "support-bot", "path": str(adapter_store / "attn-r8")}]})
    )
    store = ("--lora-store", str(adapter_store), "--adapters-config", str(config))
    p0, p1 = (
        worker("prefill", "lora-prefill-0", log, *store),
        worker("prefill", "lora-prefill-1", log, *store),
    )
    d0, d1 = worker("decode", "lora-decode-0", log, *store), worker("decode", "lora-decode-1", log, *store)
    r11 = router("lora-router-1p1d", log, [d0], [p0])
    r22 = router("lora-router-2p2d", log, [d0, d1], [p0, p1])
    procs = [p0, p1, d0, d1, r11, r22]
    try:
        for p in procs:
            p.start()
        wait_healthy(procs)
        for r in (r11, r22):
            wait_for(lambda r=r: generate(r, request("Hi", greedy(1))).token_ids, 120, f"{r.name} serves")
        yield SimpleNamespace(p0=p0, p1=p1, d0=d0, d1=d1, r11=r11, r22=r22, workers=[p0, p1, d0, d1])
    finally:
        stop_all(procs)


def test_1p1d_mixed_adapters_match_peft(lora_cluster, prompt_ids, peft_references, record_property):
    """Every (adapter or none, prompt) pair at once through 1 prefill + 1 decode: PEFT's tokens."""
    cases = [(None, i) for i in range(len(prompt_ids))]
    cases += [(s.name, i) for s in MIXED_SPECS for i in range(len(prompt_ids))]

    def run(case):
        name, i = case
        return generate(lora_cluster.r11, request(prompt_ids[i], greedy(MAX_NEW), adapter=name or ""))

    with ThreadPoolExecutor(len(cases)) as ex:
        results = list(ex.map(run, cases))
    notes: list[str] = []
    for case, res in zip(cases, results):
        assert_matches(f"{case[0]}/prompt{case[1]}", res.token_ids, peft_references[case], notes)
    record_property("near_ties", notes)
    # Both sides of the pair hold the adapters now: prefill applied them to the prompt, decode after.
    for w in (lora_cluster.p0, lora_cluster.d0):
        st = w.stats()
        assert {s.name for s in MIXED_SPECS} <= set(st.adapters_device) | set(st.adapters_host)
    assert_idle([lora_cluster.p0, lora_cluster.d0])


def test_adapter_registered_by_config_is_served(lora_cluster, prompt_ids, peft_references):
    res = generate(lora_cluster.r11, request(prompt_ids[1], greedy(MAX_NEW), adapter="support-bot"))
    assert_matches("support-bot", res.token_ids, peft_references[("attn-r8", 1)], [])


def test_unknown_adapter_is_not_found(lora_cluster):
    before = lora_cluster.d0.stats()
    err = rpc_error(
        lambda: generate(lora_cluster.r11, request("Hello", greedy(4), adapter="no-such-adapter"))
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND and "no-such-adapter" in err.details()
    after = lora_cluster.d0.stats()
    assert after.in_flight == 0 and after.free_blocks == before.free_blocks
    # The decode worker refuses it itself too (a client that skips the router).
    stub = wgrpc.WorkerStub(lora_cluster.d0.channel)
    req = wpb.WorkerGenerateRequest(prompt_token_ids=[1, 2, 3], adapter="../etc", sampling=greedy(2))
    err = rpc_error(lambda: list(stub.Generate(req, timeout=30)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_admin_loads_lists_and_unloads(lora_cluster, adapter_store, tmp_path):
    admin = wgrpc.AdminStub(lora_cluster.d1.channel)
    info = admin.LoadAdapter(wpb.LoadAdapterRequest(name="all-r16", to_device=True), timeout=60)
    assert info.tier == "device" and info.rank == 16 and info.size_bytes > 0
    listed = {a.name: a for a in admin.ListAdapters(wpb.ListAdaptersRequest(), timeout=30).adapters}
    assert listed["all-r16"].tier == "device"
    assert {s.name for s in MIXED_SPECS} <= set(listed)  # the store's adapters are listed too
    assert "all-r16" in lora_cluster.d1.stats().adapters_device
    # A copy under another name, from a path on the worker.
    info = admin.LoadAdapter(
        wpb.LoadAdapterRequest(name="my-copy", path=str(adapter_store / "qv-r4")), timeout=60
    )
    assert info.tier == "host" and info.rank == 4
    admin.UnloadAdapter(wpb.UnloadAdapterRequest(name="my-copy"), timeout=30)
    listed = {a.name for a in admin.ListAdapters(wpb.ListAdaptersRequest(), timeout=30).adapters}
    assert "my-copy" not in listed
    # Errors: unknown, and files that are not an adapter for this model.
    err = rpc_error(lambda: admin.LoadAdapter(wpb.LoadAdapterRequest(name="nope"), timeout=30))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 8}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    err = rpc_error(
        lambda: admin.LoadAdapter(wpb.LoadAdapterRequest(name="broken", path=str(tmp_path)), timeout=30)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "unreadable" in err.details()
    err = rpc_error(lambda: admin.UnloadAdapter(wpb.UnloadAdapterRequest(name="nope"), timeout=30))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_admin_load_of_a_malformed_adapter_is_invalid_argument(lora_cluster, adapter_store, tmp_path):
    """Files a bare parse trips over (a lora_alpha that is no number) are the caller's error, named."""
    admin = wgrpc.AdminStub(lora_cluster.d1.channel)
    conf = json.loads((adapter_store / "qv-r4" / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**conf, "lora_alpha": "sixteen"}))
    (tmp_path / "adapter_model.safetensors").symlink_to(adapter_store / "qv-r4" / "adapter_model.safetensors")
    err = rpc_error(
        lambda: admin.LoadAdapter(wpb.LoadAdapterRequest(name="word-alpha", path=str(tmp_path)), timeout=30)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "lora_alpha 'sixteen'" in err.details()


def test_router_prefers_the_pair_holding_the_adapter(lora_cluster):
    """After one request for an adapter, later ones go to the pair that already holds it."""
    c = lora_cluster
    name = "mlp-r32"
    for w in c.workers:  # start clean: nobody holds it
        try:
            wgrpc.AdminStub(w.channel).UnloadAdapter(wpb.UnloadAdapterRequest(name=name), timeout=30)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
    generate(c.r22, request("Tell me about rivers.", greedy(4), adapter=name))
    holders = [w for w in c.workers if name in w.stats().adapters_device]
    assert len(holders) == 2 and {h.stats().role for h in holders} == {"prefill", "decode"}
    time.sleep(1.5)  # the router refreshes worker stats every 0.5 s
    for k in range(4):
        generate(c.r22, request(f"Tell me about lakes, part {k}.", greedy(4), adapter=name))
    now = [w for w in c.workers if name in set(w.stats().adapters_device) | set(w.stats().adapters_host)]
    assert [w.name for w in now] == [w.name for w in holders], "the adapter was loaded on another pair"
    loads = {
        w.name: w.metric("tandem_adapter_requests_total", role=w.stats().role, tier="device") for w in holders
    }
    assert all(v >= 4 for v in loads.values()), loads
    # Busy time (the autoscaler's capacity signal) grows on every worker that computed something.
    assert all(w.metric("tandem_engine_busy_seconds_total", role=w.stats().role) > 0 for w in holders)
