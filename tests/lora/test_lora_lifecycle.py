"""An adapter's life beside the requests that use it: unload and re-point refused while any request
for it is unfinished, a name's cached KV never reused for other weights, reads that land late,
malformed files, and requests that can never fit beside their adapter.

Each case was a reviewer's reproduction: a request answered by two adapters, KV of the old
weights served for the new ones, or one bad adapter stopping the engine for everyone.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem_worker.engine import lora as lora_mod
from tandem_worker.engine.block_manager import BlockManager
from tandem_worker.engine.config import ModelConfig
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.lora import AdapterBusyError, AdapterError, LoRAManager, read_peft_adapter
from tandem_worker.engine.sampling_params import RequestError, SamplingParams
from tests.engine.conftest import run_all
from tests.engine.test_engine_vs_hf import assert_matches
from tests.lora.conftest import GREEDY

SHORT = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def run_one(engine: LLMEngine, prompt: list[int], adapter: str | None, params: SamplingParams = SHORT):
    rid = engine.add_request(prompt_token_ids=prompt, params=params, adapter=adapter)
    return run_all(engine)[rid]


def steps_until_idle(engine: LLMEngine, max_steps: int) -> dict:
    """Step until every request has ended, failing the test if that takes over `max_steps` steps."""
    final: dict = {}
    for _ in range(max_steps):
        final.update({o.request_id: o for o in engine.step() if o.finished})
        if not engine.has_unfinished():
            return final
    pytest.fail(f"requests still unfinished after {max_steps} steps (stalled): {engine.stats()}")


@pytest.fixture(scope="module")
def long_prompt(hf_tokenizer) -> list[int]:
    """Two full blocks and more: its KV is shared through the prefix cache."""
    ids = hf_tokenizer.encode("A list of rivers and their lengths, longest first: " * 4)
    assert len(ids) > 32
    return ids


def test_an_adapter_is_not_unloaded_while_a_request_for_it_is_unfinished(
    model_dir, adapter_store, prompt_ids, peft_references
):
    """Queued, running or preempted (holding no pin), a request keeps its adapter: unloading it is
    refused until the request ends, which then answers with that adapter throughout."""
    engine = LLMEngine(
        model=str(model_dir),
        kv_cache_bytes=20 * 2**20,
        lora_store=str(adapter_store),
        admission_watermark_blocks_per_seq=0,
    )
    bm, lora = engine.block_manager, engine.lora
    lora.load("qv-r4", to_device=True)
    bs, room = bm.block_size, bm.num_blocks - bm.num_adapter_blocks
    # A base request filling all but one block, to a block's end: its first decode step needs one
    # more block, and the adapter request admitted after it is preempted to free one. (Taking the
    # block a running decode needs next is what the admission watermark prevents: off here.)
    long = engine.add_request(prompt_token_ids=list(range(1000, 1000 + (room - 1) * bs)), params=SHORT)
    x = engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY, adapter="qv-r4")
    with pytest.raises(AdapterBusyError, match="in use by 1 unfinished request"):
        lora.unload("qv-r4")  # queued
    engine.step()
    assert {s.request_id for s in engine.scheduler.running} == {long, x}
    with pytest.raises(AdapterBusyError, match="in use by 1 unfinished request"):
        lora.unload("qv-r4")  # running, pinned
    final = {o.request_id: o for o in engine.step() if o.finished}
    assert engine.stats()["preemptions"] == 1 and [s.request_id for s in engine.scheduler.waiting] == [x]
    assert not lora.info("qv-r4").pinned
    with pytest.raises(AdapterBusyError, match="in use by 1 unfinished request"):
        lora.unload("qv-r4")  # preempted: no pin, but its answer so far came from this adapter
    with pytest.raises(AdapterBusyError, match="in use by 1 unfinished request"):
        lora.load("qv-r4", path=adapter_store / "attn-r8")  # nor pointed at other weights
    with pytest.raises(AdapterBusyError, match="in use by 1 unfinished request"):
        lora.admin_read("qv-r4", adapter_store / "attn-r8")  # Admin's: refused before any read
    final.update(run_all(engine))
    assert final[x].error is None and final[long].error is None
    assert_matches("qv-r4 preempted", final[x].token_ids, peft_references[("qv-r4", 0)], [])
    # An aborted request lets go too.
    aborted = engine.add_request(prompt_token_ids=prompt_ids[1], params=GREEDY, adapter="qv-r4")
    engine.step()
    engine.abort(aborted)
    lora.unload("qv-r4")
    assert bm.num_free_blocks + bm.num_adapter_blocks == bm.num_blocks


def test_a_name_pointed_at_other_weights_never_reuses_its_old_kv(model_dir, adapter_store, long_prompt):
    """`load(name, other_path)` once the name is paged out of host and device memory: the new
    weights' requests compute their prompt afresh and answer as the new adapter does."""
    engine = LLMEngine(
        model=str(model_dir),
        kv_cache_bytes=48 * 2**20,
        lora_store=str(adapter_store),
        lora_host_cache_bytes=1,  # one adapter at a time in host memory
    )
    lora = engine.lora
    lora.load("X", path=adapter_store / "all-r16")
    old = run_one(engine, long_prompt, "X")
    lora.load("new-ref", path=adapter_store / "attn-r8")  # the new weights under a name of their own
    new = run_one(engine, long_prompt, "new-ref")
    assert old.token_ids != new.token_ids
    while lora.evict_one():  # other adapters' traffic pages X out of the device...
        pass
    assert lora.info("X").tier == "store"  # ...and (a host cache of one adapter) out of memory
    queued = engine.add_request(prompt_token_ids=long_prompt, params=SHORT, adapter="X")
    with pytest.raises(AdapterBusyError, match="in use by 1 unfinished request"):
        lora.load("X", path=adapter_store / "attn-r8")
    engine.abort(queued)
    lora.load("X", path=adapter_store / "attn-r8")
    first = run_one(engine, long_prompt, "X")
    assert first.num_cached_tokens == 0, "KV computed with the old weights served the new ones"
    assert first.token_ids == new.token_ids
    again = run_one(engine, long_prompt, "X")
    assert again.num_cached_tokens > 0 and again.token_ids == new.token_ids


def test_adapter_files_replaced_on_disk_get_a_new_cache_salt(model_dir, adapter_store, tmp_path, long_prompt):
    """A store adapter whose files are replaced while it is paged out: the next read notices, and
    requests, including one that arrived before the read, answer with the new files."""
    store = tmp_path / "store"
    shutil.copytree(adapter_store / "all-r16", store / "X")
    engine = LLMEngine(
        model=str(model_dir), kv_cache_bytes=48 * 2**20, lora_store=str(store), lora_host_cache_bytes=1
    )
    lora = engine.lora
    old = run_one(engine, long_prompt, "X")
    lora.load("new-ref", path=adapter_store / "attn-r8")
    new = run_one(engine, long_prompt, "new-ref")
    assert old.token_ids != new.token_ids
    while lora.evict_one():
        pass
    assert lora.info("X").tier == "store"
    shutil.rmtree(store / "X")
    shutil.copytree(adapter_store / "attn-r8", store / "X")
    first = run_one(engine, long_prompt, "X")
    assert first.error is None and first.num_cached_tokens == 0
    assert first.token_ids == new.token_ids
    again = run_one(engine, long_prompt, "X")
    assert again.num_cached_tokens > 0 and again.token_ids == new.token_ids


def test_a_read_that_lands_after_unload_is_dropped(
    model_dir, adapter_store, prompt_ids, peft_references, monkeypatch
):
    """A read of the old files still running when the adapter is unloaded does not come back as
    the name's weights: a later load from another path serves that path."""
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=48 * 2**20)
    lora = engine.lora
    old_path, new_path = adapter_store / "all-r16", adapter_store / "attn-r8"
    started, release = threading.Event(), threading.Event()
    real = lora_mod.read_peft_adapter

    def slow_read(path, *args, **kwargs):  # a large adapter on a slow volume
        if Path(path) == old_path:
            started.set()
            release.wait(60)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(lora_mod, "read_peft_adapter", slow_read)
    lora.register("X", old_path)
    rid = engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY, adapter="X")  # starts the read
    assert started.wait(60)
    read = lora._loading["X"]
    engine.abort(rid)
    lora.unload("X")
    release.set()
    read.result(timeout=60)  # the old files' read has finished on the loader thread
    assert not lora.known("X"), "the unloaded adapter came back from a read started before unload"
    lora.load("X", path=new_path)
    out = run_one(engine, prompt_ids[0], "X", GREEDY)
    assert_matches("X from the new path", out.token_ids, peft_references[("attn-r8", 0)], [])


def _copy_adapter(src: Path, dst: Path, config: object | None = None, tensors: dict | None = None) -> Path:
    dst.mkdir(parents=True)
    text = json.dumps(config) if config is not None else (src / "adapter_config.json").read_text()
    (dst / "adapter_config.json").write_text(text)
    if tensors is None:
        shutil.copy(src / "adapter_model.safetensors", dst / "adapter_model.safetensors")
    else:
        save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def test_malformed_adapters_are_adapter_errors(tmp_path, adapter_store, model_dir):
    """Files that are not a LoRA adapter in ways a bare parse trips over (TypeError, IndexError...)
    are refused as AdapterError naming the problem."""
    cfg = ModelConfig.from_folder(model_dir)
    good = adapter_store / "qv-r4"
    conf = json.loads((good / "adapter_config.json").read_text())
    tensors = load_file(good / "adapter_model.safetensors")
    key_a = next(k for k in tensors if "q_proj.lora_A" in k)
    key_b = key_a.replace("lora_A", "lora_B")
    cases = {
        "null-alpha": ({**conf, "lora_alpha": None}, None, "lora_alpha None is not a number"),
        "word-alpha": ({**conf, "lora_alpha": "sixteen"}, None, "lora_alpha 'sixteen' is not a number"),
        "bool-alpha": ({**conf, "lora_alpha": True}, None, "lora_alpha True is not a number"),
        "list-config": ([], None, "adapter_config.json is a list"),
        "scalar-a": (None, {**tensors, key_a: torch.tensor(1.0)}, "q_proj: A ()"),
        "vector-b": (None, {**tensors, key_b: torch.zeros(576)}, "do not fit"),
        "rank-mismatch": (None, {**tensors, key_b: torch.zeros(576, 3)}, "do not fit"),
        "int-weights": (None, {**tensors, key_a: torch.zeros(4, 576, dtype=torch.int32)}, "do not fit"),
    }
    for name, (config, weights, message) in cases.items():
        path = _copy_adapter(good, tmp_path / name, config, weights)
        with pytest.raises(AdapterError, match=re.escape(message)):
            read_peft_adapter(path, cfg, torch.float32)
    # A numeric string is still a number, as before.
    path = _copy_adapter(good, tmp_path / "string-alpha", {**conf, "lora_alpha": "8"})
    assert read_peft_adapter(path, cfg, torch.float32).scaling["q_proj"] == 2.0


def test_a_malformed_adapter_fails_only_its_requests(
    model_dir, adapter_store, tmp_path, prompt_ids, peft_references, monkeypatch
):
    """A store adapter that crashed a bare parse, and an adapter whose acquisition raises anything
    at all: their requests end with the reason; the engine serves the same batch's others."""
    store = tmp_path / "store"
    good = adapter_store / "qv-r4"
    conf = json.loads((good / "adapter_config.json").read_text())
    tensors = load_file(good / "adapter_model.safetensors")
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    _copy_adapter(good, store / "null-alpha", {**conf, "lora_alpha": None})
    _copy_adapter(good, store / "scalar", tensors={**tensors, key: torch.tensor(1.0)})
    (store / "good").symlink_to(good)
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=48 * 2**20, lora_store=str(store))
    ids = {
        engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY): None,
        engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY, adapter="null-alpha"): "null-alpha",
        engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY, adapter="scalar"): "scalar",
        engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY, adapter="good"): "qv-r4",
    }
    final = run_all(engine)
    for rid, name in ids.items():
        if name in ("null-alpha", "scalar"):
            assert final[rid].finish_reason == "abort" and f"adapter {name!r}" in final[rid].error
        else:
            assert final[rid].error is None
            assert_matches(str(name), final[rid].token_ids, peft_references[(name, 0)], [])
    # Whatever acquiring an adapter raises is that request's failure, not the engine's.
    real_acquire = engine.lora.acquire

    def acquire(name: str, **kwargs):
        if name == "good":
            raise RuntimeError("device copy failed")
        return real_acquire(name, **kwargs)

    monkeypatch.setattr(engine.lora, "acquire", acquire)
    bad = engine.add_request(prompt_token_ids=prompt_ids[1], params=GREEDY, adapter="good")
    base = engine.add_request(prompt_token_ids=prompt_ids[1], params=GREEDY)
    final = run_all(engine)
    assert final[bad].finish_reason == "abort" and "device copy failed" in final[bad].error
    assert_matches("base", final[base].token_ids, peft_references[(None, 1)], [])
    bm = engine.block_manager
    assert bm.num_free_blocks + bm.num_adapter_blocks == bm.num_blocks


def test_a_request_that_cannot_fit_beside_its_adapter_is_refused_or_failed(
    model_dir, adapter_store, prompt_ids, peft_references, monkeypatch
):
    """Its KV fits the pool, but not beside its adapter's blocks: refused when it arrives if the
    adapter is in memory; failed, not left at the head of the queue for ever, if it was not."""
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=24 * 2**20, lora_store=str(adapter_store))
    bm, lora = engine.block_manager, engine.lora
    lora.load("all-r16", to_device=True)
    bs, room = bm.block_size, bm.num_blocks - bm.num_adapter_blocks
    assert 4 <= room < bm.num_blocks // 2
    too_long = list(range(1000, 1000 + (room + 2) * bs))  # fits the pool, not beside the adapter
    engine.validate(too_long, SHORT)
    with pytest.raises(RequestError, match="beside adapter 'all-r16'") as e:
        engine.add_request(prompt_token_ids=too_long, params=SHORT, adapter="all-r16")
    assert e.value.field == "prompt"
    fits = list(range(1000, 1000 + room * bs - 4))
    long_answer = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    with pytest.raises(RequestError, match="beside adapter 'all-r16'") as e:
        engine.add_request(prompt_token_ids=fits, params=long_answer, adapter="all-r16")
    assert e.value.field == "max_tokens"
    lora.load("o-down-r64")  # in host memory: larger than the whole pool
    with pytest.raises(RequestError, match="'o-down-r64' needs .* KV blocks and the whole KV cache has") as e:
        engine.add_request(prompt_token_ids=prompt_ids[0], params=SHORT, adapter="o-down-r64")
    assert e.value.field == "adapter"
    assert engine.num_unfinished == 0
    # The same requests when the adapter was not read yet as they arrived: the scheduler finds out.
    with monkeypatch.context() as m:
        m.setattr(lora, "num_blocks", lambda name: None)
        big = engine.add_request(prompt_token_ids=too_long, params=SHORT, adapter="all-r16")
    base = engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY)
    final = steps_until_idle(engine, 3 * GREEDY.max_tokens)
    assert final[big].finish_reason == "abort"
    assert "can never fit" in final[big].error and "'all-r16'" in final[big].error
    assert_matches("base behind it", final[base].token_ids, peft_references[(None, 0)], [])
    assert bm.num_free_blocks + bm.num_adapter_blocks == bm.num_blocks
    # One admitted a chunk at a time (no prefix cache to resume from) whose KV outgrows the room
    # beside its adapter: alone, it fails, rather than preempt itself and start over for ever.
    engine = LLMEngine(
        model=str(model_dir),
        kv_cache_bytes=24 * 2**20,
        lora_store=str(adapter_store),
        max_num_batched_tokens=64,
        enable_prefix_caching=False,
    )
    engine.lora.load("all-r16", to_device=True)
    with monkeypatch.context() as m:
        m.setattr(engine.lora, "num_blocks", lambda name: None)
        grows = engine.add_request(prompt_token_ids=fits, params=long_answer, adapter="all-r16")
    final = steps_until_idle(engine, 3 * long_answer.max_tokens)
    assert final[grows].finish_reason == "abort" and "can never fit" in final[grows].error
    assert 0 < len(final[grows].token_ids) < long_answer.max_tokens
    bm = engine.block_manager
    assert bm.num_free_blocks + bm.num_adapter_blocks == bm.num_blocks


def test_peft_options_that_change_the_computation_are_refused(tmp_path, adapter_store, model_dir):
    """Activated LoRA (applied from its invocation tokens on), replicated layers, adapted raw
    parameters: served as plain LoRA they would answer wrongly, so they are refused by name."""
    cfg = ModelConfig.from_folder(model_dir)
    good = adapter_store / "qv-r4"
    conf = json.loads((good / "adapter_config.json").read_text())
    for option, value in {
        "alora_invocation_tokens": [504, 2988],
        "layer_replication": [[0, 4], [2, 5]],
        "target_parameters": ["mlp.experts.gate_up_proj"],
    }.items():
        path = _copy_adapter(good, tmp_path / option, {**conf, option: value})
        with pytest.raises(AdapterError, match=f"unsupported PEFT option.*{option}"):
            read_peft_adapter(path, cfg, torch.float32)
    # Present but empty (what PEFT writes when unused): nothing to refuse.
    empty = {**conf, "target_parameters": [], "layer_replication": None}
    path = _copy_adapter(good, tmp_path / "empty", empty)
    assert read_peft_adapter(path, cfg, torch.float32).max_rank == 4


def test_the_store_lists_only_names_requests_can_use(tmp_path, model_dir):
    """A store folder whose name requests cannot use is not listed (it would never be found)."""
    cfg = ModelConfig.from_folder(model_dir)
    store = tmp_path / "store"
    for name in ("my adapter", "adapter+v2", "_private", ".hidden", "ok-v1.2"):
        (store / name).mkdir(parents=True)
        (store / name / "adapter_config.json").write_text("{}")
    kv_cache = torch.zeros(2, cfg.num_hidden_layers, 4, 16, cfg.num_key_value_heads, cfg.head_dim)
    lora = LoRAManager(cfg, BlockManager(4, 16), kv_cache, store_dir=store)
    try:
        assert lora.store_names() == ["ok-v1.2"]
        assert [a.name for a in lora.list()] == ["ok-v1.2"]
    finally:
        lora.close()


def test_fit_max_tokens_lowers_max_tokens_to_the_room_beside_the_adapter(model_dir, adapter_store):
    # A chat request without max_tokens: the router offers the rest of the context, and the
    # worker lowers it to what its KV cache holds beside the prompt and the adapter; refusing it
    # was a 400 for every such request on an adapter.
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=24 * 2**20, lora_store=str(adapter_store))
    bm = engine.block_manager
    engine.lora.load("all-r16", to_device=True)
    room_tokens = (bm.num_blocks - bm.num_adapter_blocks) * bm.block_size
    prompt = list(range(1000, 1040))
    params = SamplingParams(max_tokens=8000, temperature=0.0, ignore_eos=True, fit_max_tokens=True)
    engine.validate(prompt, params)  # the server thread's check: the whole pool
    assert params.max_tokens == bm.num_blocks * bm.block_size + 1 - len(prompt)
    rid = engine.add_request(prompt_token_ids=prompt, params=params, adapter="all-r16")
    # The engine thread's, on the request's own copy: beside the adapter.
    assert engine._requests[rid].seq.params.max_tokens == room_tokens + 1 - len(prompt)
    engine.abort(rid)
    strict = SamplingParams(max_tokens=8000, temperature=0.0)  # asked for: still refused
    with pytest.raises(RequestError, match="max_tokens: 40 prompt tokens \\+ 8000 max_tokens can never fit"):
        engine.add_request(prompt_token_ids=prompt, params=strict, adapter="all-r16")
    too_long = list(range(1000, 1000 + room_tokens + 1))  # a prompt that cannot fit is refused still
    with pytest.raises(RequestError) as e:
        engine.add_request(
            prompt_token_ids=too_long,
            params=SamplingParams(max_tokens=9, fit_max_tokens=True),
            adapter="all-r16",
        )
    assert e.value.field == "prompt"
