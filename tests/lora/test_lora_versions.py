"""The version of a LoRA adapter in the KV handshake: a prefill worker and a decode worker read an
adapter from their own stores, so one name may stand for two versions of its files (a per-pod copy
being replaced, a shared volume re-read by one worker and not yet by the other). A prompt's KV
computed with one version must never be continued with the other: the prefill worker sends the
digest of the files it computed with, and the decode worker refuses KV of another version before
producing any token, freeing its blocks, with a status the router retries on another pair.

The prefill worker runs in this process (as in tests/serving/test_worker_in_process.py), where one
test holds its KV at a chosen point.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from safetensors.torch import load_file, save_file

from tandem_proto.v1 import worker_pb2 as wpb
from tandem_proto.v1 import worker_pb2_grpc as wgrpc
from tandem_worker.engine.config import EngineConfig
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.server import engine_loop
from tandem_worker.server.kv_transfer import prefill_stub
from tandem_worker.server.local import free_port
from tandem_worker.server.router import _retryable
from tandem_worker.server.worker_main import serve_worker
from tests.engine.test_engine_vs_hf import assert_matches
from tests.lora.conftest import MAX_NEW
from tests.serving.procs import HOST, KV_BYTES, greedy, stop_all, wait_for, wait_healthy, worker
from tests.serving.test_worker_in_process import fake_prefill, serving

ADAPTER = "attn-r8"  # of the session's adapter store: PEFT's tokens for it are the reference


def _other_version(src: Path, dst: Path) -> Path:
    """The adapter in `src` retrained: the same config and shapes, other B weights."""
    dst.mkdir(parents=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(src / "adapter_model.safetensors")
    save_file(
        {k: -2 * t if ".lora_B." in k else t for k, t in tensors.items()}, dst / "adapter_model.safetensors"
    )
    return dst


@pytest.fixture(scope="module")
def stores(adapter_store, tmp_path_factory) -> dict[str, Path]:
    """The prefill worker's store and the decode worker's: "twin" is the same files in both, "bot"
    another version on the decode side, "race" starts as "twin" does (its test replaces the prefill
    side's files)."""
    root = tmp_path_factory.mktemp("adapter-versions")
    src = adapter_store / ADAPTER
    prefill, decode = root / "prefill", root / "decode"
    for name in ("twin", "bot", "race"):
        shutil.copytree(src, prefill / name)
    shutil.copytree(src, decode / "twin")
    _other_version(src, decode / "bot")
    _other_version(src, decode / "race")
    return {"prefill": prefill, "decode": decode}


@contextlib.contextmanager
def lora_worker(role: str, model_dir: Path, store: Path) -> Iterator[tuple[grpc.Channel, str]]:
    """A worker with an adapter store, served by a thread of this process: (a channel, its address)."""
    port, stop = free_port(), threading.Event()
    config = EngineConfig(model=str(model_dir), kv_cache_bytes=KV_BYTES, lora_store=str(store))
    thread = threading.Thread(
        target=serve_worker, args=(role, config, HOST, port), kwargs={"stop_event": stop}, daemon=True
    )
    thread.start()
    channel = grpc.insecure_channel(f"{HOST}:{port}")
    try:
        wait_for(lambda: serving(channel), 120, f"the in-process {role} worker serves")
        yield channel, f"{HOST}:{port}"
    finally:
        stop.set()
        channel.close()
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def pair(stores, model_dir, tmp_path_factory):
    """(prefill channel, its address, decode channel): the prefill worker in this process, the decode
    worker a process of its own (two workers' metrics cannot share one process)."""
    d = worker(
        "decode", "versions-decode", tmp_path_factory.mktemp("logs"), "--lora-store", str(stores["decode"])
    )
    d.start()
    try:
        with lora_worker("prefill", model_dir, stores["prefill"]) as (p, p_addr):
            wait_healthy([d])
            yield p, p_addr, d.channel
    finally:
        stop_all([d])


def generate(
    decode: grpc.Channel, prefill_addr: str, prompt: list[int], adapter: str, tokens: list[int], rid=""
):
    """The decode worker's answer, pulling the prompt's KV from `prefill_addr`; tokens land in
    `tokens` as they come (so a test sees that none came before a failure)."""
    req = wpb.WorkerGenerateRequest(
        request_id=rid or uuid.uuid4().hex,
        prompt_token_ids=prompt,
        sampling=greedy(MAX_NEW),
        adapter=adapter,
        prefill_endpoint=prefill_addr,
    )
    for msg in wgrpc.WorkerStub(decode).Generate(req, timeout=120):
        tokens.extend(msg.token_ids)
    return tokens


def digests(channel: grpc.Channel) -> dict[str, str]:
    listed = wgrpc.AdminStub(channel).ListAdapters(wpb.ListAdaptersRequest(), timeout=10).adapters
    return {a.name: a.digest for a in listed}


def assert_idle(channel: grpc.Channel, role: str) -> None:
    """No block held for a request (adapters' blocks aside), nothing in flight."""

    def idle() -> bool:
        s = wgrpc.AdminStub(channel).Stats(wpb.StatsRequest(), timeout=2)
        return s.used_blocks == s.adapter_blocks and s.in_flight == s.running == s.waiting == 0

    wait_for(idle, 10, f"the {role} worker frees every block")


def test_kv_of_another_adapter_version_is_refused_before_any_token(pair, prompt_ids):
    prefill, prefill_addr, decode = pair
    tokens: list[int] = []
    with pytest.raises(grpc.RpcError) as err:
        generate(decode, prefill_addr, prompt_ids[0], "bot", tokens)
    theirs, mine = digests(prefill)["bot"], digests(decode)["bot"]
    assert theirs and mine and theirs != mine
    # FAILED_PRECONDITION naming an incompatible KV layout: the router retries it on another pair
    # without taking either worker, neither broken, out of rotation (UNAVAILABLE would).
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    details = err.value.details()
    assert "incompatible KV layout" in details and prefill_addr in details
    assert f"adapter 'bot' version {theirs[:12]} (here {mine[:12]})" in details
    assert _retryable(err.value.code(), details) and "prefill worker" in details  # tried elsewhere
    assert tokens == []
    assert_idle(decode, "decode")
    assert_idle(prefill, "prefill")


def test_the_same_adapter_files_in_two_stores_are_served(pair, prompt_ids, peft_references):
    prefill, prefill_addr, decode = pair
    notes: list[str] = []
    out = generate(decode, prefill_addr, prompt_ids[1], "twin", [])
    assert_matches("twin", out, peft_references[(ADAPTER, 1)], notes)
    base = generate(decode, prefill_addr, prompt_ids[1], "", [])
    assert_matches("base model", base, peft_references[(None, 1)], notes)
    # Operators see which version each worker holds: the digest of the files, wherever they lie.
    assert digests(prefill)["twin"] == digests(decode)["twin"] != ""
    assert_idle(decode, "decode")


def test_kv_from_an_older_prefill_worker_without_a_digest_is_accepted(pair, prompt_ids):
    """A rolling upgrade: a prefill worker that sends no digest is trusted, as before."""
    _, prefill_addr, decode = pair
    upstream = grpc.insecure_channel(prefill_addr)

    def older(request, context):  # the prefill worker's stream, less the field it did not know
        for chunk, key, value in prefill_stub(upstream)(request, timeout=60):
            chunk.ClearField("adapter_digest")
            if key is not None:
                chunk.key, chunk.value = bytes(key), bytes(value)
            yield chunk.SerializeToString()

    try:
        with fake_prefill(older) as port:
            out = generate(decode, f"{HOST}:{port}", prompt_ids[2], "bot", [])
    finally:
        upstream.close()
    assert len(out) == MAX_NEW


def test_a_prefill_worker_whose_adapter_changed_after_the_kv_was_computed_refuses_to_vouch(
    pair, stores, prompt_ids, monkeypatch
):
    """The prefill request ends (releasing its adapter) before its first KV is sent; meanwhile the
    adapter's files are replaced and read again, now the version the decode worker holds. The KV
    was computed with the old files: sending the new digest would pass the decode worker's check."""
    prefill, prefill_addr, decode = pair
    rid = "race-1"
    held, release = threading.Event(), threading.Event()
    events = engine_loop.RequestStream.events

    def hold_first_kv(self, heartbeat_s=None):
        for ev in events(self, heartbeat_s):
            if self.request_id == f"kv-{rid}" and isinstance(ev, engine_loop.KVPiece) and not held.is_set():
                held.set()
                release.wait(60)
            yield ev

    monkeypatch.setattr(engine_loop.RequestStream, "events", hold_first_kv)
    admin = wgrpc.AdminStub(prefill)
    tokens: list[int] = []
    with ThreadPoolExecutor(1) as ex:
        answer = ex.submit(generate, decode, prefill_addr, prompt_ids[0], "race", tokens, rid)
        try:
            assert held.wait(60)
            old = digests(prefill)["race"]

            def unloaded() -> bool:  # refused while the prefill request is unfinished
                admin.UnloadAdapter(wpb.UnloadAdapterRequest(name="race"), timeout=10)
                return True

            wait_for(unloaded, 30, "the prefill request ends and its adapter unloads")
            shutil.rmtree(stores["prefill"] / "race")
            shutil.copytree(stores["decode"] / "race", stores["prefill"] / "race")
            new = admin.LoadAdapter(wpb.LoadAdapterRequest(name="race", to_device=True), timeout=60).digest
            assert new == digests(decode)["race"] != old
        finally:
            release.set()
        with pytest.raises(grpc.RpcError) as err:
            answer.result(timeout=120)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    details = err.value.details()
    assert "incompatible KV layout" in details and "adapter 'race' changed" in details, details
    assert _retryable(err.value.code(), details)
    assert tokens == []
    assert_idle(decode, "decode")


def test_a_read_records_the_digest_of_the_files_it_parsed(model_dir, adapter_store, tmp_path, monkeypatch):
    """Files replaced while they are read are read again: the digest is of the weights served, and
    `version` counts the change. Unchanged files read again keep their digest without hashing them
    again (an adapter paged out of host memory); changed ones get theirs."""
    from tandem_worker.engine import lora as lora_mod

    store = tmp_path / "store"
    shutil.copytree(adapter_store / ADAPTER, store / "X")
    newer = _other_version(adapter_store / ADAPTER, tmp_path / "newer")
    newest = _other_version(newer, tmp_path / "newest")
    engine = LLMEngine(
        model=str(model_dir), kv_cache_bytes=32 * 2**20, lora_store=str(store), lora_host_cache_bytes=1
    )
    lora = engine.lora
    assert lora.version("X") == ("", 0)
    first = lora.load("X")
    assert first.digest and lora.version("X") == (first.digest, 0)
    lora.unload("X")

    real, hashed = lora_mod.adapter_digest, []

    def counted(*args) -> str:
        hashed.append(real(*args))
        return hashed[-1]

    monkeypatch.setattr(lora_mod, "adapter_digest", counted)
    read, reads = lora_mod.read_peft_adapter, []

    def replaced_during_the_read(path, *args, **kwargs):
        adapter = read(path, *args, **kwargs)
        reads.append(adapter.digest)
        if len(reads) == 1:  # a new version lands while the old one is parsed
            shutil.rmtree(store / "X")
            shutil.copytree(newer, store / "X")
        return adapter

    monkeypatch.setattr(lora_mod, "read_peft_adapter", replaced_during_the_read)
    info = lora.load("X", to_device=True)
    assert reads == [first.digest, info.digest] and info.digest != first.digest
    assert lora.version("X") == (info.digest, 1)
    assert lora.info("X").digest == info.digest  # on the device

    def page_out() -> None:  # other adapters' traffic takes X out of device and host memory
        while lora.evict_one():
            pass
        lora.load("other", path=adapter_store / "qv-r4")
        assert lora.info("X").tier == "store"

    page_out()
    hashed.clear()
    assert lora.load("X").digest == info.digest and hashed == []  # the same files
    page_out()
    shutil.rmtree(store / "X")
    shutil.copytree(newest, store / "X")
    latest = lora.load("X").digest
    assert hashed == [latest] and latest not in (first.digest, info.digest)
    assert lora.version("X") == (latest, 2)


def test_an_admin_load_during_a_read_serves_what_that_read_found(
    model_dir, adapter_store, tmp_path, monkeypatch
):
    """An admin load of an adapter whose read is under way (a request asked for it) waits for that
    read rather than reading the files a second time: two reads could find two versions, and the
    later one replace the version listed while the device holds the other."""
    from tandem_worker.engine import lora as lora_mod

    store = tmp_path / "store"
    shutil.copytree(adapter_store / ADAPTER, store / "X")
    newer = _other_version(adapter_store / ADAPTER, tmp_path / "newer")
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=32 * 2**20, lora_store=str(store))
    lora = engine.lora
    read, started, release = lora_mod.read_peft_adapter, threading.Event(), threading.Event()

    def slow_on_the_loader(path, *args, **kwargs):  # a large adapter on a slow volume
        if threading.current_thread().name.startswith("lora-load"):
            started.set()
            release.wait(60)
        return read(path, *args, **kwargs)

    monkeypatch.setattr(lora_mod, "read_peft_adapter", slow_on_the_loader)
    lora.prefetch("X")  # a request for X arrived: its read starts in the background
    background = lora._loading["X"]
    assert started.wait(60)
    with ThreadPoolExecutor(1) as ex:
        admin = ex.submit(lora.load, "X", None, True)
        # The files are replaced while the background read waits. Time for an admin load that read
        # them itself to finish (and put the old ones on the device); one that waits never does.
        with contextlib.suppress(TimeoutError):
            admin.result(timeout=1)
        shutil.rmtree(store / "X")
        shutil.copytree(newer, store / "X")
        release.set()
        info = admin.result(timeout=60)
    background.result(timeout=60)
    assert info.tier == "device" and lora.info("X").digest == lora.version("X")[0] == info.digest


@pytest.mark.parametrize("named", ["by-path", "from-the-store"])
def test_an_admin_load_reads_the_files_off_the_engine_thread(pair, stores, adapter_store, monkeypatch, named):
    """Admin's LoadAdapter read the adapter's files on the engine thread: every request's decoding
    stalled for the read (seconds for a large adapter, up to the load timeout on a slow volume). The
    engine now answers while the files are read: ListAdapters, which runs on it, returns meanwhile."""
    from tandem_worker.engine import lora as lora_mod

    prefill, _, _ = pair  # the worker in this process
    name = f"admin-{named}"
    request = wpb.LoadAdapterRequest(name=name, to_device=True)
    if named == "by-path":
        request.path = str(adapter_store / ADAPTER)
    else:
        shutil.copytree(adapter_store / ADAPTER, stores["prefill"] / name)
    read, started, release = lora_mod.read_peft_adapter, threading.Event(), threading.Event()

    def slow(path, *args, **kwargs):  # a large adapter on a slow volume
        started.set()
        release.wait(60)
        return read(path, *args, **kwargs)

    monkeypatch.setattr(lora_mod, "read_peft_adapter", slow)
    admin = wgrpc.AdminStub(prefill)
    with ThreadPoolExecutor(1) as ex:
        load = ex.submit(admin.LoadAdapter, request, timeout=60)
        try:
            assert started.wait(60)
            listed = admin.ListAdapters(wpb.ListAdaptersRequest(), timeout=5)  # the engine is free
            assert name not in {a.name for a in listed.adapters if a.tier in ("host", "device")}
        finally:
            release.set()
        info = load.result(timeout=60)
    assert (info.name, info.tier) == (name, "device")
    admin.UnloadAdapter(wpb.UnloadAdapterRequest(name=name), timeout=30)


def test_an_admin_load_of_broken_files_leaves_no_failed_read_for_the_next_request(
    model_dir, adapter_store, tmp_path
):
    """The admin load's read runs beside the engine now, as a request's does; its failure is the
    admin call's answer, not a failed read left for the next request of the name to fail with once
    the files are mended. Another admin load reads them again too."""
    from tandem_worker.engine.lora import AdapterError
    from tandem_worker.engine.sampling_params import SamplingParams
    from tests.engine.conftest import run_all

    store = tmp_path / "store"
    (store / "X").mkdir(parents=True)
    (store / "X" / "adapter_config.json").write_text("{not json")
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=32 * 2**20, lora_store=str(store))
    lora = engine.lora
    for _ in range(2):  # the second admin load reads the files again, not the first read's failure
        with contextlib.suppress(AdapterError):
            lora.admin_read("X").result(timeout=60)
        with pytest.raises(AdapterError, match="'X'"):
            lora.load("X")
    shutil.rmtree(store / "X")
    shutil.copytree(adapter_store / ADAPTER, store / "X")
    rid = engine.add_request(prompt="Once upon a time", params=SamplingParams(max_tokens=4), adapter="X")
    assert run_all(engine)[rid].error is None
