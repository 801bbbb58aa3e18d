"""A request preempted mid-prefill while its adapter's files are replaced on disk.

A reviewer's reproduction: such a request failed ("changed while this request ran") although
nothing computed with the old files had left the engine. It starts over with the new files.
"""

from __future__ import annotations

import shutil

import pytest

from tandem_worker.engine.llm_engine import LLMEngine
from tests.lora.test_lora_lifecycle import SHORT, run_one, steps_until_idle


@pytest.mark.parametrize("streams_kv", [False, True], ids=["colocated", "prefill-worker"])
def test_a_request_preempted_mid_prefill_restarts_with_its_adapters_new_files(
    model_dir, adapter_store, tmp_path, streams_kv
):
    """Restarted, it answers as the new files do. On a prefill worker, though, the old files' KV
    of its prompt has been streamed to a decode worker already: it fails, saying why."""
    store = tmp_path / "store"
    shutil.copytree(adapter_store / "attn-r8", store / "X")
    bs = 16
    engine = LLMEngine(
        model=str(model_dir),
        kv_cache_bytes=16 * 2**20,
        lora_store=str(store),
        lora_host_cache_bytes=1,  # one adapter at a time in host memory
        block_size=bs,
        max_num_batched_tokens=4096,
    )
    bm, lora, sched = engine.block_manager, engine.lora, engine.scheduler
    lora.load("X", to_device=True)
    room = bm.num_blocks - bm.num_adapter_blocks
    prompt = [(7 * i) % 5000 + 100 for i in range((room - 1) * bs + 5)]
    hits = 2  # blocks of X's prompt in the prefix cache when it arrives, computed with the old files
    run_one(engine, prompt[: hits * bs + 1], "X")
    # One step: a base request of one full block, then X's prefix hits and the budget left to X
    # cover the rest of the pool but the block the admission leaves free for the base request
    # (the watermark), and X's prompt needs more. Step two: the base request's first decode takes
    # that block, X's next chunk finds none, and X, the newest, is preempted mid-prefill.
    sched.max_num_batched_tokens = bs + (room - 2 - hits) * bs
    base = engine.add_request(prompt_token_ids=list(range(1000, 1000 + bs)), params=SHORT)
    sent: list[int] = []
    sink = (lambda layer, start, k, v, ready: sent.append(start)) if streams_kv else None
    x = engine.add_request(prompt_token_ids=prompt, params=SHORT, adapter="X", kv_sink=sink)
    seq = engine._requests[x].seq
    engine.step()
    assert seq.num_cached_tokens == hits * bs and seq.num_computed_tokens == (room - 2) * bs
    final = {o.request_id: o for o in engine.step() if o.finished}
    assert seq.num_preemptions == 1 and not seq.output_token_ids and seq in sched.waiting

    # While it waits: X's files are replaced, and X is paged out of the device and host memory, so
    # its next acquire reads the new files (and moves its salt on).
    shutil.rmtree(store / "X")
    shutil.copytree(adapter_store / "qv-r4", store / "X")  # smaller: X still fits beside it
    while lora.evict_one():
        pass
    lora.load("other", path=adapter_store / "all-r4")  # pushes X out of the host cache
    assert lora.info("X").tier == "store"
    final.update(steps_until_idle(engine, 200))
    assert final[base].error is None
    if streams_kv:
        assert sent, "nothing was streamed before the preemption"
        assert "changed while this request ran" in final[x].error
        return
    assert final[x].error is None, final[x].error
    # Under the new salt nothing was cached: the old files' hits are not reported as its usage.
    assert final[x].num_cached_tokens == 0

    lora.load("new-ref", path=adapter_store / "qv-r4")  # the new files under a name of their own
    lora.load("old-ref", path=adapter_store / "attn-r8")
    assert run_one(engine, prompt, "new-ref").token_ids == final[x].token_ids
    assert run_one(engine, prompt, "old-ref").token_ids != final[x].token_ids
