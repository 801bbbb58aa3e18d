"""LoRA in the engine: outputs equal PEFT's, token for token, in batches mixing nine adapters and none.

The reference is PEFT's own `PeftModel` over transformers' float32 model with each adapter made
active in turn, decoded greedily (tests/engine/test_engine_vs_hf.py's loop and near-tie rule).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tandem_kernels import cpu_extension, lora_reference
from tandem_worker.engine.config import ModelConfig
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.lora import AdapterError, AdapterNotFoundError, read_peft_adapter
from tandem_worker.engine.sampling_params import SamplingParams
from tests.engine.conftest import run_all
from tests.engine.test_engine_vs_hf import assert_matches, hf_greedy
from tests.lora.conftest import GREEDY, MIXED_SPECS


@pytest.fixture(scope="session")
def lora_engine(model_dir: Path, adapter_store: Path) -> LLMEngine:
    return LLMEngine(model=str(model_dir), kv_cache_bytes=400 * 2**20, lora_store=str(adapter_store))


def test_adapters_change_the_output(peft_references):
    """Guard for the equality test below: every adapter really changes what the model says."""
    inert = [
        spec.name
        for spec in MIXED_SPECS
        if all(peft_references[(spec.name, i)].tokens == peft_references[(None, i)].tokens for i in range(3))
    ]
    assert not inert, f"{inert} change no output: the equality test would prove nothing for them"


def count_native_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """Spy on the C++ LoRA decode op (cpu_extension); returns the list its calls land in."""
    calls: list = []
    op = cpu_extension.load()
    if op is not None:

        class Spy:  # the layer's other C++ ops pass through uncounted
            def __getattr__(self, name):
                if name == "lora_grouped":
                    return lambda *a: calls.append(1) or op.lora_grouped(*a)
                return getattr(op, name)

        monkeypatch.setattr(lora_reference.cpu_extension, "load", lambda: Spy())
    return calls


def test_mixed_batch_matches_peft(lora_engine, prompt_ids, peft_references, record_property, monkeypatch):
    """All adapters x all prompts + base requests submitted together: one heterogeneous batch."""
    engine = lora_engine
    native = count_native_calls(monkeypatch)
    for spec in MIXED_SPECS:
        engine.lora.load(spec.name)  # admin load from the store: all in host memory before the batch
    ids = {}
    for i, p in enumerate(prompt_ids):
        ids[engine.add_request(prompt_token_ids=p, params=GREEDY)] = (None, i)
        for spec in MIXED_SPECS:
            ids[engine.add_request(prompt_token_ids=p, params=GREEDY, adapter=spec.name)] = (spec.name, i)
    first = engine.step()  # every prompt is prefilled in this one step, adapters mixed
    assert not [o for o in first if o.error]
    assert len(first) == len(ids), "the whole mixed batch should have been prefilled together"
    final = run_all(engine)
    notes: list[str] = []
    for rid, key in ids.items():
        assert final[rid].error is None
        assert_matches(f"{key[0]}/prompt{key[1]}", final[rid].token_ids, peft_references[key], notes)
    record_property("near_ties", notes)
    if cpu_extension.available_compiler():  # the decode steps ran the C++ op, not the TorchScript loop
        assert native
    stats = engine.lora.stats
    assert stats.loads == len(MIXED_SPECS) and stats.load_failures == 0
    # Nothing pinned after the batch: every adapter can be evicted now.
    assert all(not a.pinned for a in engine.lora.list())


def test_decode_batch_mixes_adapters(lora_engine, prompt_ids, peft_references):
    """Requests for different adapters arriving at different steps share decode steps and stay correct."""
    engine = lora_engine
    notes: list[str] = []
    order = [None] + [s.name for s in MIXED_SPECS]
    ids = {}
    final = {}
    for k, name in enumerate(order):
        i = k % len(prompt_ids)
        ids[engine.add_request(prompt_token_ids=prompt_ids[i], params=GREEDY, adapter=name)] = (name, i)
        # Each new prompt joins a batch already decoding other adapters' requests.
        final.update({o.request_id: o for o in engine.step() if o.finished})
    final.update(run_all(engine))
    assert set(final) == set(ids)
    for rid, key in ids.items():
        assert_matches(f"{key[0]}/prompt{key[1]}", final[rid].token_ids, peft_references[key], notes)


def test_unknown_adapter_is_refused_and_changes_nothing(lora_engine):
    before = lora_engine.num_unfinished
    with pytest.raises(AdapterNotFoundError, match="no-such-adapter"):
        lora_engine.add_request("hello", GREEDY, adapter="no-such-adapter")
    with pytest.raises(AdapterNotFoundError):
        lora_engine.add_request("hello", GREEDY, adapter="../mixed-v2/qv-r4")  # no path tricks
    assert lora_engine.num_unfinished == before


def test_prefix_cache_is_per_adapter(lora_engine):
    """A long shared prompt: the base model's cached KV must not serve an adapter's request."""
    engine = lora_engine
    long_prompt = engine.tokenizer.encode("A list of rivers and their lengths, longest first: " * 4)
    assert len(long_prompt) > 2 * engine.config.block_size  # several full blocks, cacheable
    p = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    base = engine.add_request(prompt_token_ids=long_prompt, params=p)
    run_all(engine)
    rid = engine.add_request(prompt_token_ids=long_prompt, params=p, adapter="all-r16")
    out = run_all(engine)[rid]
    assert out.num_cached_tokens == 0, "the adapter request reused KV computed without the adapter"
    again = engine.add_request(prompt_token_ids=long_prompt, params=p, adapter="all-r16")
    out2 = run_all(engine)[again]
    assert out2.num_cached_tokens > 0 and out2.token_ids == out.token_ids
    assert base  # the base request ran first and filled the cache


def test_bad_adapters_are_refused(tmp_path, adapter_store, model_dir):
    from tandem_worker.engine.config import ModelConfig

    cfg = ModelConfig.from_folder(model_dir)
    good = adapter_store / "attn-r8"
    with pytest.raises(AdapterError, match="lacks adapter_config.json"):
        read_peft_adapter(tmp_path, cfg, torch.float32)
    # Shapes of another model: a q_proj A with the wrong input width.
    from safetensors.torch import load_file, save_file

    tensors = load_file(good / "adapter_model.safetensors")
    bad = tmp_path / "bad-shape"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    save_file({**tensors, key: torch.zeros(8, 100)}, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="do not fit"):
        read_peft_adapter(bad, cfg, torch.float32)
    # A module Tandem cannot adapt (the embedding).
    emb = tmp_path / "bad-target"
    emb.mkdir()
    (emb / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    save_file(
        {**tensors, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 10)},
        emb / "adapter_model.safetensors",
    )
    with pytest.raises(AdapterError, match="cannot adapt"):
        read_peft_adapter(emb, cfg, torch.float32)


def test_200_adapters_page_through_a_small_pool(model_dir, many_adapter_store, hf_tokenizer):
    """A pool that holds a handful of adapters at a time serves a stream over 200 of them.

    Adapters are read from the store on first use, evicted when the pool is full, and read or
    copied back when asked for again; sampled outputs equal PEFT's.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = sorted(p.name for p in many_adapter_store.iterdir())
    assert len(names) == 200
    engine = LLMEngine(
        model=str(model_dir),
        kv_cache_bytes=48 * 2**20,  # 66 blocks of 737 KB: a rank-8 all-projection adapter takes 14
        lora_store=str(many_adapter_store),
        lora_host_cache_bytes=64 * 2**20,  # a few dozen adapters: the host tier evicts too
        max_num_seqs=8,
    )
    prompt = hf_tokenizer.encode("My favourite animal is")
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    ids = {}
    done: dict = {}
    # All 200, then the first 20 again once 180 others have pushed them out. (Queued together, a
    # second request for an adapter would share the first one's load: it goes ahead of requests
    # waiting for room, see the scheduler.)
    for stream in (names, names[:20]):
        for k, name in enumerate(stream):
            ids[engine.add_request(prompt_token_ids=prompt, params=params, adapter=name)] = (k, name)
            if k % 4 == 3:
                done.update({o.request_id: o for o in engine.step() if o.finished})
        done.update(run_all(engine))
    assert len(done) == 220
    assert not [o for o in done.values() if o.error]
    lora = engine.lora.stats
    assert lora.device_evictions > 150 and lora.host_evictions > 0
    assert lora.device_loads > len(names), "evicted adapters were never loaded back"
    assert (
        engine.block_manager.num_free_blocks + engine.block_manager.num_adapter_blocks
        == engine.block_manager.num_blocks
    )
    resident = engine.lora.resident()["device"]
    assert 0 < len(resident) < 10
    # Every request of the same adapter says the same thing, however the adapter was paged.
    by_name: dict[str, list[list[int]]] = {}
    for rid, (_, name) in ids.items():
        if rid in done:
            by_name.setdefault(name, []).append(done[rid].token_ids)
    assert all(len({tuple(t) for t in v}) == 1 for v in by_name.values())
    # And what it says is PEFT's answer, for a sample including reloaded adapters.
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sample = names[:6] + names[100:103] + names[-3:]
    model = PeftModel.from_pretrained(base, many_adapter_store / sample[0], adapter_name=sample[0]).eval()
    notes: list[str] = []
    for name in sample:
        if name != sample[0]:
            model.load_adapter(many_adapter_store / name, adapter_name=name)
        model.set_adapter(name)
        ref = hf_greedy(model, prompt, 4)
        assert_matches(name, by_name[name][0], ref, notes)
    assert len({tuple(v[0]) for v in by_name.values()}) > 20, "the adapters should not all agree"


def test_adapter_that_fails_to_load_fails_only_its_requests(
    model_dir, adapter_store, tmp_path, prompt_ids, peft_references
):
    """A store entry that is not a valid adapter is found to be broken when first read, on the
    loader thread: its requests end with the reason, the others (same batch) are served."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "good").symlink_to(adapter_store / "qv-r4")
    broken = store / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 8}')
    (broken / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=64 * 2**20, lora_store=str(store))
    bad = engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY, adapter="broken")
    good = engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY, adapter="good")
    base = engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY)
    final: dict = {}
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert final[bad].finish_reason == "abort" and "unreadable" in final[bad].error
    notes: list[str] = []
    assert final[good].error is None and final[base].error is None
    assert_matches("good", final[good].token_ids, peft_references[("qv-r4", 0)], notes)
    assert_matches("base", final[base].token_ids, peft_references[(None, 0)], notes)
    assert engine.lora.stats.load_failures == 1
    bm = engine.block_manager
    assert bm.num_free_blocks + bm.num_adapter_blocks == bm.num_blocks  # nothing leaked


def test_an_adapter_with_no_room_lets_the_queue_pass_for_a_while(
    model_dir, adapter_store, prompt_ids, peft_references
):
    """A request whose adapter finds no room on the device (the pool held by a long request's KV and
    a pinned adapter) lets the base model and resident adapters behind it run, for
    `adapter_wait_steps` steps of its wait; then the queue waits behind it, and it runs (with
    PEFT's output) as soon as room frees."""
    engine = LLMEngine(
        model=str(model_dir), kv_cache_bytes=48 * 2**20, lora_store=str(adapter_store), max_num_seqs=8
    )
    sched, bm = engine.scheduler, engine.block_manager
    sched.adapter_wait_steps = 3
    for name in ("mlp-r32", "qv-r4"):
        engine.lora.load(name)  # on the host: the waits below are for room, not for the store
    long_params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    long = engine.add_request(prompt_token_ids=list(range(1000, 1640)), params=long_params)  # 40 blocks
    pinned = engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY, adapter="qv-r4")
    final: dict = {}

    def step() -> set[str]:
        final.update({o.request_id: o for o in engine.step() if o.finished})
        return {s.request_id for s in sched.running}

    for _ in range(10):  # until both have prefilled
        if {long, pinned} <= step() and all(s.num_uncomputed_tokens <= 1 for s in sched.running):
            break
    else:
        pytest.fail("the long and pinned requests never both reached decode")
    assert bm.num_blocks == 68 and bm.num_free_blocks < 38  # mlp-r32 takes 38 contiguous blocks
    big = engine.add_request(prompt_token_ids=prompt_ids[1], params=GREEDY, adapter="mlp-r32")
    base = engine.add_request(prompt_token_ids=prompt_ids[0], params=GREEDY)
    resident = engine.add_request(prompt_token_ids=prompt_ids[2], params=GREEDY, adapter="qv-r4")
    running = step()
    assert {base, resident} <= running and big not in running, "the queue waited behind big"
    assert [s.request_id for s in sched.waiting] == [big]
    while sched.waiting[0].num_adapter_waits < 3:
        assert big not in step()
    late = engine.add_request(prompt_token_ids=prompt_ids[1], params=GREEDY)
    for _ in range(3):  # big has waited its 3 steps: now the queue waits behind it
        assert late not in step() and long not in final
        assert [s.request_id for s in sched.waiting] == [big, late]
    while engine.has_unfinished():
        running = step()
        if late in running:
            assert big in running or big in final, "late ran before big"
    notes: list[str] = []
    for rid, (name, i) in {
        big: ("mlp-r32", 1),
        base: (None, 0),
        resident: ("qv-r4", 2),
        late: (None, 1),
        pinned: ("qv-r4", 0),
    }.items():
        assert final[rid].error is None
        assert_matches(f"{name}/{i}", final[rid].token_ids, peft_references[(name, i)], notes)
    assert bm.num_free_blocks + bm.num_adapter_blocks == bm.num_blocks  # nothing leaked


def test_per_layer_ranks_match_peft(model_dir, tmp_path, hf_tokenizer):
    """PEFT's rank_pattern keyed by layer: down_proj at rank 4 in layer 0 and 2, 16 elsewhere, each
    layer scaled by its own alpha / r (folded into B, as the kernels scale per module)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from benchmarks.make_adapters import AdapterSpec, make_adapters

    spec = AdapterSpec(
        "per-layer", 16, ("q_proj", "down_proj"), alpha=16, seed=11, b_std=0.2,
        rank_pattern={"model.layers.0.mlp.down_proj": 4, "model.layers.2.mlp.down_proj": 4},
    )  # fmt: skip
    (path,) = make_adapters(model_dir, tmp_path, [spec]).values()
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=64 * 2**20, lora_store=str(tmp_path))
    host = read_peft_adapter(path, engine.model_config, torch.float32)
    ranks = {layer: a.shape[0] for (layer, module), (a, _) in host.weights.items() if module == "down_proj"}
    assert ranks[0] == ranks[2] == 4 and ranks[1] == 16
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, path).eval()
    prompt = hf_tokenizer.encode("The capital of France is")
    ours = engine.add_request(prompt_token_ids=prompt, params=GREEDY, adapter="per-layer")
    plain = engine.add_request(prompt_token_ids=prompt, params=GREEDY)
    done = run_all(engine)
    notes: list[str] = []
    assert_matches(
        "per-layer", done[ours].token_ids, hf_greedy(peft, prompt, len(done[ours].token_ids)), notes
    )
    assert done[ours].token_ids != done[plain].token_ids  # the adapter (and its low-rank layers) matters


def test_per_module_alphas_match_peft(model_dir, tmp_path, hf_tokenizer):
    """PEFT's alpha_pattern: a module name for every layer's down_proj, one layer's q_proj by its
    full name, and an alpha of 0 for layer 0's (the scaling the kernels apply is then another
    layer's). The first key that matches wins, as in PEFT: layer 1's down_proj keeps 64."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from benchmarks.make_adapters import AdapterSpec, make_adapters

    spec = AdapterSpec(
        "alphas", 8, ("q_proj", "down_proj"), alpha=8, seed=12, b_std=0.2,
        alpha_pattern={
            "model.layers.0.self_attn.q_proj": 0, "down_proj": 64, "model.layers.1.mlp.down_proj": 1
        },
    )  # fmt: skip
    (path,) = make_adapters(model_dir, tmp_path, [spec]).values()
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=64 * 2**20, lora_store=str(tmp_path))
    host = read_peft_adapter(path, engine.model_config, torch.float32)
    assert host.scaling == {"q_proj": 1.0, "down_proj": 8.0}
    assert not host.weights[(0, "q_proj")][1].any()  # alpha 0: folded into B as zeros
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, path).eval()
    assert peft.base_model.model.model.layers[1].mlp.down_proj.scaling["default"] == 8.0
    prompt = hf_tokenizer.encode("The capital of France is")
    ours = engine.add_request(prompt_token_ids=prompt, params=GREEDY, adapter="alphas")
    done = run_all(engine)
    notes: list[str] = []
    assert_matches("alphas", done[ours].token_ids, hf_greedy(peft, prompt, len(done[ours].token_ids)), notes)
    # The same weights read with alpha_pattern dropped answer otherwise: the pattern matters.
    conf = json.loads((path / "adapter_config.json").read_text())
    plain = tmp_path / "store2" / "alphas"
    plain.mkdir(parents=True)
    (plain / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    (plain / "adapter_config.json").write_text(json.dumps({**conf, "alpha_pattern": {}}))
    other = LLMEngine(model=str(model_dir), kv_cache_bytes=64 * 2**20, lora_store=str(plain.parent))
    again = other.add_request(prompt_token_ids=prompt, params=GREEDY, adapter="alphas")
    assert run_all(other)[again].token_ids != done[ours].token_ids


def test_a_malformed_alpha_pattern_is_refused(model_dir, tmp_path, adapter_store):
    conf = json.loads((adapter_store / "qv-r4" / "adapter_config.json").read_text())
    cfg = ModelConfig.from_folder(model_dir)
    for pattern, message in [
        (["q_proj"], "alpha_pattern is a list"),
        ({"q_proj(": 4}, "not a regular expression"),
        ({"q_proj": "four"}, "lora_alpha 'four' is not a number"),
    ]:
        path = tmp_path / str(len(message))
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(
            (adapter_store / "qv-r4" / "adapter_model.safetensors").read_bytes()
        )
        (path / "adapter_config.json").write_text(json.dumps({**conf, "alpha_pattern": pattern}))
        with pytest.raises(AdapterError, match=message):
            read_peft_adapter(path, cfg, torch.float32)
