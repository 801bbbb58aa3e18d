"""A resident adapter whose files are replaced on disk while requests keep it busy.

The reviewer's reproduction: an adapter always in use (some request pinning it on the device) was
never read again, so a worker served its first version for good after the files were replaced,
and in disaggregated serving every request for it then failed the digest check against prefill
workers that had read the new files. Now a stat of the files, at most every
`files_check_interval_s` per adapter, notices the change: the new files are read in the
background, requests that have computed with the old version finish on it, later ones wait for the
new version (within the load timeout) and are served by it.

The manager's clock is moved on by hand: no assertion depends on how fast anything runs.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.lora import adapter_digest
from tandem_worker.engine.sampling_params import SamplingParams
from tests.engine.conftest import run_all
from tests.engine.test_engine_vs_hf import assert_matches
from tests.lora.conftest import GREEDY
from tests.lora.test_lora_lifecycle import SHORT, run_one

OLD, NEW = "attn-r8", "qv-r4"  # of the session's store; NEW takes fewer blocks, so it fits where OLD did


class Clock:
    """time.monotonic moved on by `advance` (requests' arrival times are on its scale)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def replace(folder: Path, src: Path) -> None:
    """Replace an adapter's files as an operator's copy does: new files under the same path."""
    shutil.rmtree(folder)
    shutil.copytree(src, folder)


def digest_of(folder: Path) -> str:
    return adapter_digest((folder / "adapter_config.json").read_bytes(), folder / "adapter_model.safetensors")


def make_engine(model_dir: Path, store: Path, interval: float, **kwargs) -> tuple[LLMEngine, Clock]:
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=kwargs.pop("kv_cache_bytes", 32 * 2**20),
                       lora_store=str(store), **kwargs)  # fmt: skip
    clock = Clock()
    engine.lora.clock = clock
    engine.lora.files_check_interval_s = interval
    return engine, clock


def assert_no_leak(engine: LLMEngine) -> None:
    """Every block is free or an adapter's, each resident adapter's blocks are counted once."""
    bm, lora = engine.block_manager, engine.lora
    assert not engine.has_unfinished()
    assert bm.num_free_blocks + bm.num_adapter_blocks == bm.num_blocks
    device = lora.resident()["device"]
    assert bm.num_adapter_blocks == sum(lora.num_blocks(n) for n in device)
    assert not any(lora.info(n).pinned for n in device)


@pytest.fixture
def store(tmp_path: Path, adapter_store: Path) -> Path:
    out = tmp_path / "store"
    shutil.copytree(adapter_store / OLD, out / "X")
    return out


def test_a_busy_adapter_serves_its_replaced_files_to_requests_arriving_once_the_change_is_seen(
    model_dir, adapter_store, store, prompt_ids, peft_references
):
    old_ref, new_ref = peft_references[(OLD, 0)], peft_references[(NEW, 0)]
    assert old_ref.tokens != new_ref.tokens
    engine, clock = make_engine(model_dir, store, interval=5.0)
    sched, lora = engine.scheduler, engine.lora
    old_digest = lora.load("X", to_device=True).digest
    a = engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY, adapter="X")
    final = {}
    for _ in range(2):
        final.update({o.request_id: o for o in engine.step() if o.finished})
    replace(store / "X", adapter_store / NEW)
    # Within the check interval the files are not looked at: a request arriving now is served by
    # the version in memory, as one arriving just before the change would be.
    c = engine.add_request(prompt_token_ids=prompt_ids[1], params=GREEDY, adapter="X")
    engine.step()
    assert {s.request_id for s in sched.running} == {a, c}

    clock.advance(6)  # past the interval: the next request for X notices the change
    b = engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY, adapter="X")
    seq_b = engine._requests[b].seq
    while a not in final or c not in final:
        # A and C, admitted before, finish on the old version, and the version the KV handshake
        # reports is theirs; B waits (no new request joins the old version, so its users drain).
        assert lora.version("X") == (old_digest, 0)
        assert seq_b in sched.waiting and seq_b.lora_slot is None
        final.update({o.request_id: o for o in engine.step() if o.finished})
    final.update(run_all(engine))
    notes: list[str] = []
    assert_matches("A, before the change", final[a].token_ids, old_ref, notes)
    assert_matches("C, before the change was seen", final[c].token_ids, peft_references[(OLD, 1)], notes)
    assert final[b].error is None, final[b].error
    assert_matches("B, after", final[b].token_ids, new_ref, notes)
    assert final[b].num_cached_tokens == 0, "KV of A's prompt computed with the old files served B"
    assert lora.version("X") == (digest_of(store / "X"), 1) and lora.info("X").digest == lora.version("X")[0]
    # As a fresh read of the new files answers (their own name: the engine, not PEFT, as the judge).
    lora.load("new-files", path=adapter_store / NEW)
    assert run_one(engine, prompt_ids[0], "new-files", GREEDY).token_ids == final[b].token_ids
    assert lora.stats.device_evictions >= 1  # the old version's blocks went back
    assert_no_leak(engine)


def test_a_request_that_computed_with_the_old_version_finishes_on_it_after_a_preemption(
    model_dir, adapter_store, store, prompt_ids, peft_references
):
    """Preempted with tokens sampled, it holds no pin while the change is noticed: it takes the
    old version again (not the new one, which would fail it), and the switch waits for it."""
    engine, _ = make_engine(
        model_dir, store, interval=0.0, kv_cache_bytes=20 * 2**20, admission_watermark_blocks_per_seq=0
    )
    bm, lora, sched = engine.block_manager, engine.lora, engine.scheduler
    lora.load("X", to_device=True)
    bs, room = bm.block_size, bm.num_blocks - bm.num_adapter_blocks
    # As in test_an_adapter_is_not_unloaded_while_a_request_for_it_is_unfinished: a base request
    # filling all but one block to a block's end, whose first decode preempts X's request.
    long = engine.add_request(prompt_token_ids=list(range(1000, 1000 + (room - 1) * bs)), params=SHORT)
    x = engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY, adapter="X")
    engine.step()
    final = {o.request_id: o for o in engine.step() if o.finished}
    seq_x = engine._requests[x].seq
    assert seq_x in sched.waiting and seq_x.output_token_ids and not lora.info("X").pinned
    replace(store / "X", adapter_store / NEW)
    b = engine.add_request(prompt_token_ids=prompt_ids[2], params=GREEDY, adapter="X")
    final.update(run_all(engine))
    notes: list[str] = []
    assert final[long].error is None
    assert final[x].error is None, final[x].error
    assert_matches("preempted X", final[x].token_ids, peft_references[(OLD, 0)], notes)
    assert final[b].error is None, final[b].error
    assert_matches("after the change", final[b].token_ids, peft_references[(NEW, 2)], notes)
    assert lora.version("X") == (digest_of(store / "X"), 1)
    assert_no_leak(engine)


def test_the_wait_for_the_old_versions_users_is_bounded_by_the_load_timeout(
    model_dir, adapter_store, store, prompt_ids
):
    engine, clock = make_engine(model_dir, store, interval=0.0)
    lora = engine.lora
    long_params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    old = engine.add_request(prompt_token_ids=prompt_ids[2], params=long_params, adapter="X")
    while not engine._requests[old].seq.output_token_ids:  # X is read in the background first
        engine.step()
    replace(store / "X", adapter_store / NEW)
    b = engine.add_request(prompt_token_ids=prompt_ids[0], params=SHORT, adapter="X")
    lora._refresh["X"].read.result(timeout=60)  # the new files are in: only the old user keeps B out
    assert not [o for o in engine.step() if o.finished]
    clock.advance(lora.load_timeout_s + 1)
    failed = {o.request_id: o for o in engine.step() if o.finished}
    assert set(failed) == {b}
    assert "files changed on disk" in failed[b].error and "did not finish within" in failed[b].error
    final = run_all(engine)
    assert final[old].error is None and len(final[old].token_ids) == 40
    lora.load("old-files", path=adapter_store / OLD)
    assert run_one(engine, prompt_ids[2], "old-files", long_params).token_ids == final[old].token_ids
    # The old version drained: the next request gets the new one.
    lora.load("new-files", path=adapter_store / NEW)
    assert (
        run_one(engine, prompt_ids[0], "X").token_ids == run_one(engine, prompt_ids[0], "new-files").token_ids
    )
    assert lora.version("X") == (digest_of(store / "X"), 1)
    assert_no_leak(engine)


def test_unreadable_new_files_leave_the_version_in_memory_serving_until_they_change_again(
    model_dir, adapter_store, store, prompt_ids, peft_references
):
    """A copy caught half-written (or a bad push) must not take a live adapter down; the next
    change of the files is read."""
    engine, _ = make_engine(model_dir, store, interval=0.0)
    lora = engine.lora
    old_digest = lora.load("X", to_device=True).digest
    (store / "X" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    notes: list[str] = []
    out = run_one(engine, prompt_ids[1], "X", GREEDY)
    assert out.error is None, out.error
    assert_matches("bad new files", out.token_ids, peft_references[(OLD, 1)], notes)
    assert lora.version("X") == (old_digest, 0)
    loads = lora.stats.loads + lora.stats.load_failures
    run_one(engine, prompt_ids[1], "X")
    assert lora.stats.loads + lora.stats.load_failures == loads, "the same bad files were read again"
    replace(store / "X", adapter_store / NEW)
    out = run_one(engine, prompt_ids[1], "X", GREEDY)
    assert_matches("good new files", out.token_ids, peft_references[(NEW, 1)], notes)
    assert lora.version("X") == (digest_of(store / "X"), 1)
    assert_no_leak(engine)


def test_the_same_bytes_copied_again_keep_the_adapter_and_its_cached_kv(model_dir, adapter_store, store):
    engine, _ = make_engine(model_dir, store, interval=0.0)
    lora = engine.lora
    prompt = list(range(100, 140))  # two full blocks: shared through the prefix cache
    first = run_one(engine, prompt, "X")
    device_loads = lora.stats.device_loads
    replace(store / "X", adapter_store / OLD)  # new inodes and times, the same content
    again = run_one(engine, prompt, "X")
    assert again.num_cached_tokens > 0 and again.token_ids == first.token_ids
    assert lora.stats.device_loads == device_loads and lora.version("X")[1] == 0
    assert_no_leak(engine)


def test_an_admin_load_of_a_resident_adapter_reads_its_replaced_files(model_dir, adapter_store, store):
    engine, _ = make_engine(model_dir, store, interval=3600.0)  # requests alone would not look yet
    lora = engine.lora
    old_digest = lora.load("X", to_device=True).digest
    replace(store / "X", adapter_store / NEW)
    info = lora.load("X", to_device=True)
    assert info.tier == "device" and info.digest == digest_of(store / "X") != old_digest
    assert lora.version("X") == (info.digest, 1)
    # Broken files: the admin hears why, and the version in memory serves on.
    (store / "X" / "adapter_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="serves on"):
        lora.load("X")
    assert lora.info("X").digest == info.digest
    assert_no_leak(engine)


def test_a_read_of_the_new_files_that_hangs_leaves_the_old_version_serving(
    model_dir, adapter_store, store, prompt_ids, peft_references, monkeypatch
):
    """A volume that stops answering mid-read: past the load timeout the requests waiting for the
    new version are served by the old one, not failed."""
    from tandem_worker.engine import lora as lora_mod

    engine, clock = make_engine(model_dir, store, interval=0.0)
    lora = engine.lora
    old_digest = lora.load("X", to_device=True).digest
    read, started, release = lora_mod.read_peft_adapter, threading.Event(), threading.Event()

    def hangs_on_the_loader(path, *args, **kwargs):
        if threading.current_thread().name.startswith("lora-load"):
            started.set()
            release.wait(60)
        return read(path, *args, **kwargs)

    monkeypatch.setattr(lora_mod, "read_peft_adapter", hangs_on_the_loader)
    replace(store / "X", adapter_store / NEW)
    try:
        x = engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY, adapter="X")
        assert started.wait(60)
        assert not engine.step() and engine._requests[x].seq.lora_slot is None  # waits for the read
        clock.advance(lora.load_timeout_s + 1)
        final = run_all(engine)
        # While that read still hangs no other starts (it would queue behind it on the loader, and
        # the next requests wait out the timeout again): a later request is admitted at once.
        y = engine.add_request(prompt_token_ids=prompt_ids[1], params=GREEDY, adapter="X")
        engine.step()
        assert engine._requests[y].seq.lora_slot is not None
        final.update(run_all(engine))
    finally:
        release.set()
    assert final[x].error is None, final[x].error
    assert_matches("old version", final[x].token_ids, peft_references[(OLD, 0)], [])
    assert_matches("old version, later", final[y].token_ids, peft_references[(OLD, 1)], [])
    assert lora.version("X") == (old_digest, 0)
    assert_no_leak(engine)


def test_a_files_check_that_hangs_never_stops_the_engine(
    model_dir, adapter_store, store, prompt_ids, monkeypatch
):
    # A store on a network filesystem that stops answering: the check's stat blocks. It runs on the
    # loader's thread, so requests for the adapter in memory decode on; once the store answers
    # again, the replaced files are noticed and read.
    import tandem_worker.engine.lora as lora_module

    engine, clock = make_engine(model_dir, store, interval=1.0)
    lora = engine.lora
    old_digest = lora.load("X", to_device=True).digest
    stamp, answer, asked = lora_module._stamp, threading.Event(), threading.Event()

    def hanging_stamp(path):
        asked.set()
        answer.wait(60)
        return stamp(path)

    monkeypatch.setattr(lora_module, "_stamp", hanging_stamp)
    replace(store / "X", adapter_store / NEW)
    clock.advance(2)  # past the interval: the next request for X checks the files
    started = time.monotonic()
    a = engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY, adapter="X")
    clock.advance(2)
    b = engine.add_request(prompt_token_ids=prompt_ids[1], params=GREEDY, adapter="X")  # no second stat
    final = run_all(engine)
    assert asked.is_set() and not answer.is_set()
    assert time.monotonic() - started < 30, "the engine waited for the hanging stat"
    assert final[a].error is None and final[b].error is None and lora.version("X") == (old_digest, 0)
    answer.set()
    for _ in range(200):  # the hung stat answers (on the loader's thread), then its result is read
        clock.advance(2)
        c = engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY, adapter="X")
        final = run_all(engine)
        if lora.version("X")[1] == 1:
            break
        time.sleep(0.01)
    assert lora.version("X") == (digest_of(store / "X"), 1) and final[c].error is None
    assert_no_leak(engine)
