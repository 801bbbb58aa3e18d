"""`Scheduler` over a real `BlockManager`, stepped by hand with fake sampled tokens. No model, no tensors."""

from __future__ import annotations

import itertools
import random

import pytest

from tandem_worker.engine.block_manager import BlockManager
from tandem_worker.engine.sampling_params import SamplingParams
from tandem_worker.engine.scheduler import Scheduler, SchedulerOutput
from tandem_worker.engine.sequence import Sequence, SequenceStatus

BS = 4
_prompt_bases = itertools.count(1)


def make_seq(rid: str, prompt_len: int, max_tokens: int, base: int | None = None) -> Sequence:
    """A request whose prompt shares no token with other requests (so no accidental prefix hits)."""
    start = base if base is not None else 10_000 * next(_prompt_bases)
    return Sequence(rid, list(range(start, start + prompt_len)), SamplingParams(max_tokens=max_tokens))


class Sim:
    """Drives a `Scheduler` the way `LLMEngine.step` does, checking invariants on every step.

    Each step: `schedule()`; `on_step_done(out)`; then every chunk that `completes` gets a fake
    sampled token, and a sequence that reached `max_tokens` is finished. (The engine calls
    `on_step_done` before appending the sampled token; `completes` is judged before the append.)
    """

    def __init__(
        self,
        num_blocks: int,
        budget: int,
        max_num_seqs: int = 64,
        block_size: int = BS,
        prefix_caching: bool = True,
    ) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
        self.sched = Scheduler(self.bm, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)
        self.budget = budget
        self.steps: list[SchedulerOutput] = []
        self.first_scheduled: dict[str, int] = {}
        self.finished: list[Sequence] = []
        # Simulated KV contents: (block, slot) -> the token prefix whose KV the slot holds.
        self.kv: dict[tuple[int, int], tuple[int, ...]] = {}
        self._next_token = 1

    def add(self, *seqs: Sequence) -> None:
        for s in seqs:
            self.sched.add(s)

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        n = len(self.steps)
        self.steps.append(out)
        assert out.num_tokens <= self.budget
        assert len(self.sched.running) <= self.sched.max_num_seqs
        seen = set()
        for c in out.chunks:
            seq = c.seq
            assert seq.request_id not in seen, "a sequence scheduled twice in one step"
            seen.add(seq.request_id)
            assert seq.status is SequenceStatus.RUNNING
            assert c.num_tokens >= 1
            assert c.start == seq.num_computed_tokens
            assert len(seq.block_table) * self.bm.block_size >= c.start + c.num_tokens
            self._check_and_write_kv(seq, c.start, c.num_tokens)
            self.first_scheduled.setdefault(seq.request_id, n)
        for s in out.preempted:
            assert s.status is SequenceStatus.WAITING and not s.block_table
            assert s not in self.sched.running
        completing = [c.seq for c in out.chunks if c.completes]
        self.sched.on_step_done(out)
        for seq in completing:
            seq.output_token_ids.append(self._next_token)
            self._next_token += 1
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                self.sched.finish(seq)
                self.finished.append(seq)
        self._check_refcounts()
        return out

    def _check_and_write_kv(self, seq: Sequence, start: int, num: int) -> None:
        bs, toks = self.bm.block_size, seq.all_token_ids
        for p in range(start):  # what attention will read must be this sequence's own prefix
            assert self.kv.get((seq.block_table[p // bs], p % bs)) == tuple(toks[: p + 1]), "stale KV read"
        for p in range(start, start + num):
            block = seq.block_table[p // bs]
            assert self.bm.ref_counts[block] == 1, "writing into a shared block"
            self.kv[(block, p % bs)] = tuple(toks[: p + 1])

    def _check_refcounts(self) -> None:
        refs = [0] * self.bm.num_blocks
        for s in [*self.sched.running, *self.sched.reserved.values()]:
            for b in s.block_table:
                refs[b] += 1
        for s in [*self.sched.waiting, *self.sched.awaiting]:
            assert not s.block_table
        assert refs == self.bm.ref_counts

    def land_remote_kv(self, seq: Sequence) -> None:
        """What a prefill worker's KV transfer does: fill the reserved blocks with the prompt's KV."""
        bs, toks = self.bm.block_size, seq.all_token_ids
        for p in range(seq.num_prompt_tokens):
            self.kv[(seq.block_table[p // bs], p % bs)] = tuple(toks[: p + 1])

    def run(self, max_steps: int = 2000) -> None:
        while self.sched.has_work:
            out = self.step()
            assert not out.is_empty, "no progress with work pending"
            assert len(self.steps) < max_steps, "simulation did not finish"
        self.assert_all_free()

    def assert_all_free(self) -> None:
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.ref_counts == [0] * self.bm.num_blocks


def chunk_of(out: SchedulerOutput, seq: Sequence):
    return next((c for c in out.chunks if c.seq is seq), None)


# --- budget and ordering -----------------------------------------------------------------------


@pytest.mark.parametrize(("budget", "max_num_seqs"), [(1, 4), (7, 3), (16, 8), (64, 64)])
def test_token_budget_is_never_exceeded(budget, max_num_seqs):
    sim = Sim(num_blocks=64, budget=budget, max_num_seqs=max_num_seqs)
    rng = random.Random(budget)
    seqs = [make_seq(f"r{i}", rng.randint(1, 40), rng.randint(1, 6)) for i in range(10)]
    sim.add(*seqs)
    sim.run()
    assert max(o.num_tokens for o in sim.steps) <= budget
    assert all(s.is_finished and len(s.output_token_ids) == s.params.max_tokens for s in seqs)


def test_whole_prompt_fits_in_one_step_when_budget_allows():
    sim = Sim(num_blocks=16, budget=64)
    a = make_seq("a", 30, 2)
    sim.add(a)
    out = sim.step()
    assert out.admitted == [a]
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(0, 30)]
    assert len(a.output_token_ids) == 1  # the chunk completed the prompt, so a token was sampled


def test_decodes_are_scheduled_before_new_prefills():
    sim = Sim(num_blocks=64, budget=10)
    d1, d2 = make_seq("d1", 3, 50), make_seq("d2", 5, 50)
    sim.add(d1, d2)
    sim.step()  # both prefill in one step
    assert len(d1.output_token_ids) == len(d2.output_token_ids) == 1
    p = make_seq("p", 30, 2)
    sim.add(p)
    out = sim.step()
    assert [c.seq for c in out.chunks] == [d1, d2, p]
    assert [c.num_tokens for c in out.chunks] == [1, 1, 8]
    assert out.admitted == [p]
    assert not p.output_token_ids


def test_chunked_prefill_does_not_stall_decodes():
    budget = 8
    sim = Sim(num_blocks=64, budget=budget)
    dec = make_seq("dec", 4, 40)
    sim.add(dec)
    sim.step()
    long = make_seq("long", 45, 3)
    sim.add(long)
    prefill_chunks = []
    while not long.output_token_ids:
        before = len(dec.output_token_ids)
        out = sim.step()
        c = chunk_of(out, dec)
        assert c is not None and c.num_tokens == 1, "the decode was stalled by the prefill"
        assert len(dec.output_token_ids) == before + 1
        assert out.chunks[0].seq is dec
        lc = chunk_of(out, long)
        prefill_chunks.append(lc.num_tokens)
        assert out.num_tokens <= budget
    # 45 prompt tokens in chunks of budget - 1 = 7.
    assert prefill_chunks == [7, 7, 7, 7, 7, 7, 3]
    assert sim.sched.stats.num_chunked_prefill_steps == 6
    sim.run()
    assert len(long.output_token_ids) == 3 and len(dec.output_token_ids) == 40


def test_max_num_seqs_is_respected():
    sim = Sim(num_blocks=64, budget=100, max_num_seqs=2)
    seqs = [make_seq(f"r{i}", 5, 4) for i in range(5)]
    sim.add(*seqs)
    out = sim.step()
    assert out.admitted == seqs[:2]
    assert len(sim.sched.running) == 2 and len(sim.sched.waiting) == 3
    running_sizes = []
    while sim.sched.has_work:
        running_sizes.append(len(sim.sched.running))
        o = sim.step()
        assert len({c.seq.request_id for c in o.chunks}) <= 2
        assert len(sim.sched.running) <= 2
    assert max(running_sizes) == 2
    assert all(s.is_finished for s in seqs)
    sim.assert_all_free()


def test_head_of_queue_is_never_skipped():
    # 6 blocks; a holds 4. "big" (first in line) needs 3 and cannot fit; "small" behind it would.
    sim = Sim(num_blocks=6, budget=64)
    a = make_seq("a", 16, 3)
    sim.add(a)
    sim.step()
    big, small = make_seq("big", 12, 1), make_seq("small", 2, 1)
    sim.add(big, small)
    out = sim.step()  # a grows to 5 blocks: 1 left, enough for small but not for big
    assert chunk_of(out, a) is not None
    assert sim.bm.num_free_blocks == 1 == sim.bm.blocks_needed(small.num_tokens)
    assert out.admitted == [], "a later request jumped the queue"
    assert list(sim.sched.waiting) == [big, small]
    sim.run()
    assert sim.first_scheduled["big"] <= sim.first_scheduled["small"]


def test_fcfs_with_a_small_pool_everyone_finishes_in_arrival_order():
    rng = random.Random(7)
    sim = Sim(num_blocks=10, budget=16, max_num_seqs=4)
    seqs = [make_seq(f"r{i:02d}", rng.randint(2, 20), rng.randint(2, 12)) for i in range(16)]
    for s in seqs:
        assert sim.bm.blocks_needed(s.num_prompt_tokens + s.params.max_tokens) <= sim.bm.num_blocks
    pending = list(seqs)
    admission_order: list[str] = []
    while pending or sim.sched.has_work:
        if pending:  # one arrival per step
            sim.add(pending.pop(0))
        out = sim.step()
        admission_order += [s.request_id for s in out.admitted if s.num_preemptions == 0]
        assert len(sim.steps) < 2000
    sim.assert_all_free()
    ids = [s.request_id for s in seqs]
    assert admission_order == ids
    order = [sim.first_scheduled[i] for i in ids]
    assert order == sorted(order)
    assert all(s.is_finished and len(s.output_token_ids) == s.params.max_tokens for s in seqs)
    assert sim.sched.stats.num_preemptions > 0, "the pool was meant to be tight enough to preempt"


# --- preemption --------------------------------------------------------------------------------


def test_newest_running_sequence_is_preempted_and_later_finishes():
    # 4 blocks of 4: a and b each prefill 4 tokens, then decode until both need a third block.
    sim = Sim(num_blocks=4, budget=64)
    a, b = make_seq("a", 4, 8), make_seq("b", 4, 8)
    sim.add(a, b)
    out = sim.step()
    assert out.admitted == [a, b]
    while not out.preempted:
        out = sim.step()
        assert len(sim.steps) < 20
    assert out.preempted == [b]
    assert chunk_of(out, a) is not None and chunk_of(out, b) is None
    assert b.status is SequenceStatus.WAITING
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert sim.sched.waiting[0] is b
    assert b not in sim.sched.running
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert sim.sched.stats.num_preemptions == 1
    assert not out.admitted, "nothing is admitted in a step that preempts"
    assert sum(sim.bm.ref_counts) == len(a.block_table)

    sim.run()
    assert b.is_finished and len(b.output_token_ids) == 8
    assert a.is_finished and len(a.output_token_ids) == 8
    assert b.num_preemptions == sim.sched.stats.num_preemptions
    admissions = sum(b in o.admitted for o in sim.steps)
    assert admissions == 1 + b.num_preemptions, "b resumes after every preemption"


def test_preemption_picks_the_newest_of_several_running():
    # 6 blocks of 4: three 4-token prompts each reach 2 blocks, then a needs a third.
    sim = Sim(num_blocks=6, budget=64)
    a, b, c = make_seq("a", 4, 8), make_seq("b", 4, 8), make_seq("c", 4, 8)
    sim.add(a, b, c)
    out = sim.step()
    assert out.admitted == [a, b, c]
    while not out.preempted:
        out = sim.step()
        assert len(sim.steps) < 20
    assert out.preempted[0] is c, "the most recently admitted sequence goes first"
    assert b.num_preemptions == 0 and a.num_preemptions == 0
    assert sim.sched.running == [a, b]
    assert [ch.seq for ch in out.chunks] == [a, b]
    sim.run()
    assert all(s.is_finished and len(s.output_token_ids) == 8 for s in (a, b, c))


def test_preempted_sequence_goes_before_earlier_waiting_ones():
    sim = Sim(num_blocks=4, budget=64, max_num_seqs=2)
    a, b, c = make_seq("a", 4, 8), make_seq("b", 4, 8), make_seq("c", 4, 1)
    sim.add(a, b, c)  # c waits: max_num_seqs
    out = sim.step()
    assert out.admitted == [a, b]
    while not out.preempted:
        out = sim.step()
    assert out.preempted == [b]
    assert list(sim.sched.waiting) == [b, c]
    sim.run()
    assert sim.first_scheduled["c"] >= max(i for i, o in enumerate(sim.steps) if b in o.admitted)


def test_resumed_sequence_recomputes_prompt_and_outputs():
    sim = Sim(num_blocks=4, budget=64, prefix_caching=False)
    a, b = make_seq("a", 4, 8), make_seq("b", 4, 8)
    sim.add(a, b)
    out = sim.step()
    while not out.preempted:
        out = sim.step()
    n_tokens, n_out = b.num_tokens, len(b.output_token_ids)
    while b not in out.admitted:
        out = sim.step()
    c = chunk_of(out, b)
    # Without a prefix cache the whole sequence, generated tokens included, is recomputed,
    # and the step that completes it samples the next token.
    assert (c.start, c.num_tokens) == (0, n_tokens)
    assert len(b.output_token_ids) == n_out + 1
    sim.run()


def test_single_sequence_is_never_preempted_when_it_fits():
    sim = Sim(num_blocks=3, budget=5)
    a = make_seq("a", 7, 5)  # 12 tokens: exactly 3 blocks
    sim.add(a)
    sim.run()
    assert a.num_preemptions == 0
    assert len(a.output_token_ids) == 5


# --- finishing ---------------------------------------------------------------------------------


def test_finish_frees_a_running_sequence():
    sim = Sim(num_blocks=8, budget=64)
    a, b = make_seq("a", 10, 100), make_seq("b", 6, 100)
    sim.add(a, b)
    sim.step()
    assert sim.bm.num_free_blocks == 8 - 3 - 2
    sim.sched.finish(a)
    assert a.is_finished and a.block_table == []
    assert a not in sim.sched.running
    assert sim.bm.num_free_blocks == 8 - 2
    out = sim.step()
    assert [c.seq for c in out.chunks] == [b]
    sim.sched.finish(b)
    assert not sim.sched.has_work
    sim.assert_all_free()


def test_finish_removes_a_waiting_sequence():
    sim = Sim(num_blocks=8, budget=64, max_num_seqs=1)
    a, w = make_seq("a", 4, 100), make_seq("w", 4, 100)
    sim.add(a, w)
    sim.step()
    assert list(sim.sched.waiting) == [w]
    sim.sched.finish(w)
    assert w.is_finished and w not in sim.sched.waiting
    sim.sched.finish(a)
    assert not sim.sched.has_work
    assert sim.sched.schedule().is_empty
    sim.assert_all_free()


def test_finish_a_preempted_sequence_holds_nothing():
    sim = Sim(num_blocks=4, budget=64)
    a, b = make_seq("a", 4, 8), make_seq("b", 4, 8)
    sim.add(a, b)
    out = sim.step()
    while not out.preempted:
        out = sim.step()
    sim.sched.finish(b)
    assert b not in sim.sched.waiting and b.is_finished
    sim.run()
    assert a.is_finished and len(a.output_token_ids) == 8


def test_finish_mid_prefill_frees_its_blocks():
    sim = Sim(num_blocks=16, budget=8)
    a = make_seq("a", 40, 2)
    sim.add(a)
    sim.step()
    assert a.num_computed_tokens == 8 and a.block_table
    sim.sched.finish(a)
    assert not sim.sched.has_work
    sim.assert_all_free()


# --- remote KV (decode side of disaggregation) ------------------------------------------------


def make_remote(rid: str, prompt_len: int, max_tokens: int, first_token: int) -> Sequence:
    """A request whose prompt KV and first token come from a prefill worker."""
    seq = make_seq(rid, prompt_len, max_tokens)
    seq.remote_kv = True
    seq.output_token_ids.append(first_token)
    return seq


def test_remote_kv_sequence_is_reserved_then_decodes_after_activate():
    sim = Sim(num_blocks=16, budget=64)
    local = make_seq("local", 5, 6)
    sim.add(local)
    sim.step()
    r = make_remote("r", 10, 4, first_token=777)
    sim.add(r)
    assert list(sim.sched.awaiting) == [r]
    out = sim.step()
    assert out.reserved == [r] and r.request_id in sim.sched.reserved
    assert len(r.block_table) == 3  # 11 tokens: the prompt and the first token's slot
    assert chunk_of(out, r) is None
    for _ in range(2):  # reserved: never scheduled while its KV is in transit
        assert chunk_of(sim.step(), r) is None
    sim.land_remote_kv(r)
    sim.sched.activate(r)
    assert r.status is SequenceStatus.RUNNING and r in sim.sched.running
    assert r.num_computed_tokens == 10
    out = sim.step()
    c = chunk_of(out, r)
    assert (c.start, c.num_tokens) == (10, 1)  # a decode of the first token
    sim.run()
    assert len(r.output_token_ids) == 4 and local.is_finished


def test_remote_kv_waits_for_blocks_and_finish_frees_reservations():
    sim = Sim(num_blocks=4, budget=64)
    hog = make_seq("hog", 12, 1)
    sim.add(hog)
    sim.step()  # hog computes its prompt and finishes: its 3 full blocks stay cached but free
    r1, r2 = make_remote("r1", 11, 2, 5), make_remote("r2", 11, 2, 6)
    sim.add(r1, r2)
    out = sim.step()
    assert out.reserved == [r1]  # 3 blocks each: only one fits
    assert list(sim.sched.awaiting) == [r2]
    sim.sched.finish(r2)  # aborted while awaiting
    assert not sim.sched.awaiting and r2.is_finished
    sim.sched.finish(r1)  # aborted while its KV was in transit
    assert not sim.sched.reserved and r1.is_finished
    assert not sim.sched.has_work
    sim.assert_all_free()


def test_a_chunked_prefill_does_not_stall_remote_kv_decodes_behind_it():
    """Activated remote-KV sequences join `running` behind a local prefill (on a decode worker, a
    preempted request's recompute): they decode every step while it goes on in smaller chunks.
    They got no token until its whole prompt was computed."""
    budget = 8
    sim = Sim(num_blocks=64, budget=budget)
    long = make_seq("long", 45, 2)
    sim.add(long)
    sim.step()
    r1, r2 = make_remote("r1", 5, 20, 7), make_remote("r2", 6, 20, 8)
    sim.add(r1, r2)
    assert sim.step().reserved == [r1, r2]
    for r in (r1, r2):
        sim.land_remote_kv(r)
        sim.sched.activate(r)
    assert sim.sched.running == [long, r1, r2]
    prefill_chunks = []
    while not long.output_token_ids:
        out = sim.step()
        assert [(c.seq, c.num_tokens) for c in out.chunks[1:]] == [(r1, 1), (r2, 1)], "decodes stalled"
        prefill_chunks.append(chunk_of(out, long).num_tokens)
    assert prefill_chunks == [6, 6, 6, 6, 5]  # 45 tokens: two chunks of 8 alone, then of budget - 2
    sim.run()
    assert len(r1.output_token_ids) == len(r2.output_token_ids) == 20


def test_a_preempted_request_goes_before_remote_kv_arrivals():
    """A decode worker under a steady stream of remote-KV arrivals: the reservations for arrivals
    took every block freed, step after step, and a preempted request (mid-answer) never came back
    while arrivals kept coming. It goes first, and they wait while it waits for room."""
    sim = Sim(num_blocks=4, budget=64)
    a, b = make_seq("a", 4, 12), make_seq("b", 4, 12)
    sim.add(a, b)
    out = sim.step()
    while not out.preempted:
        out = sim.step()
    assert out.preempted == [b]
    arrivals = []
    for i in range(40):
        r = make_remote(f"r{i}", 3, 2, first_token=5)
        arrivals.append(r)
        sim.add(r)
        out = sim.step()
        for x in out.reserved:
            sim.land_remote_kv(x)
            sim.sched.activate(x)
        if b in out.admitted:
            break
        assert not out.reserved, "an arrival took the blocks a preempted request waits for"
    else:
        pytest.fail("the preempted request never ran again while arrivals kept coming")
    while sim.sched.has_work:
        for x in sim.step().reserved:
            sim.land_remote_kv(x)
            sim.sched.activate(x)
        assert len(sim.steps) < 500
    sim.assert_all_free()
    assert len(b.output_token_ids) == 12 and all(len(r.output_token_ids) == 2 for r in arrivals)


def test_max_num_seqs_counts_reserved_remote_sequences():
    sim = Sim(num_blocks=32, budget=64, max_num_seqs=2)
    a = make_seq("a", 4, 10)
    sim.add(a)
    sim.step()
    r, b = make_remote("r", 6, 3, 9), make_seq("b", 4, 10)
    sim.add(r, b)
    out = sim.step()
    assert out.reserved == [r]
    assert len(sim.sched.running) + len(sim.sched.reserved) <= 2
    sim.land_remote_kv(r)
    sim.sched.activate(r)
    assert len(sim.sched.running) <= 2


# --- the prefix cache through the scheduler ----------------------------------------------------


def test_shared_prefix_is_served_from_cache():
    sim = Sim(num_blocks=32, budget=64)
    first = make_seq("first", 21, 2, base=0)
    sim.add(first)
    sim.run()
    second = Sequence("second", list(range(0, 18)) + [900, 901, 902], SamplingParams(max_tokens=2))
    sim.add(second)
    before = sim.sched.stats.num_prefill_tokens_computed
    out = sim.step()
    c = chunk_of(out, second)
    assert second.num_cached_tokens == 16  # 4 full shared blocks of 4
    assert (c.start, c.num_tokens) == (16, 5)
    assert sim.sched.stats.num_prefill_tokens_computed - before == 5
    assert sim.sched.stats.num_prefix_cached_tokens == 16
    sim.run()


def test_identical_concurrent_prompts_end_with_all_blocks_free():
    sim = Sim(num_blocks=32, budget=64)
    seqs = [Sequence(f"t{i}", list(range(13)), SamplingParams(max_tokens=3)) for i in range(3)]
    sim.add(*seqs)  # all admitted in one step: none can hit the others' uncommitted blocks
    out = sim.step()
    assert [s.num_cached_tokens for s in seqs] == [0, 0, 0]
    assert out.num_tokens == 39
    sim.run()
    late = Sequence("late", list(range(13)), SamplingParams(max_tokens=1))
    sim.add(late)
    sim.step()
    assert late.num_cached_tokens == 12
    sim.run()


# --- randomized ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_keep_every_invariant(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    num_blocks = rng.randint(4, 24)
    budget = rng.randint(2, 24)
    max_num_seqs = rng.randint(1, 6)
    sim = Sim(num_blocks, budget, max_num_seqs, block_size=block_size, prefix_caching=seed % 3 != 0)
    shared = [rng.randint(0, 3) for _ in range(24)]
    seqs = []
    for i in range(rng.randint(3, 10)):
        while True:
            plen, mt = rng.randint(1, 24), rng.randint(1, 12)
            if sim.bm.blocks_needed(plen + mt) <= num_blocks:
                break
        keep = rng.randint(0, plen)
        prompt = shared[:keep] + [rng.randint(0, 3) for _ in range(plen - keep)]
        seqs.append(Sequence(f"r{i}", prompt, SamplingParams(max_tokens=mt)))
    pending = list(seqs)
    while pending or sim.sched.has_work:
        if pending and (rng.random() < 0.6 or not sim.sched.has_work):
            sim.add(pending.pop(0))
        if sim.sched.has_work:
            out = sim.step()
            assert not out.is_empty
        assert len(sim.steps) < 3000
    sim.assert_all_free()
    assert all(s.is_finished and len(s.output_token_ids) == s.params.max_tokens for s in seqs)
    order = [sim.first_scheduled[s.request_id] for s in seqs]
    assert order == sorted(order)


# --- the admission watermark -------------------------------------------------------------------


def test_admission_leaves_a_free_block_for_each_running_sequence():
    """An admission that took the last free blocks left a running decode none for its next token:
    the next step preempted the newcomer, whose work so far was thrown away and recomputed."""
    sim = Sim(num_blocks=8, budget=64)
    a = make_seq("a", 7, 6)  # 2 blocks; its 9th token (the 2nd decode) needs a 3rd
    sim.add(a)
    sim.step()
    assert sim.bm.num_free_blocks == 6
    b = make_seq("b", 24, 2)  # exactly the 6 free blocks
    sim.add(b)
    out = sim.step()
    assert out.admitted == [], "took the block the running decode needs next"
    sim.run()
    assert sim.sched.stats.num_preemptions == 0
    assert all(s.is_finished for s in (a, b))
    assert sim.first_scheduled["b"] > max(i for i, o in enumerate(sim.steps) if chunk_of(o, a))


def test_a_remote_kv_reservation_leaves_a_free_block_for_each_running_sequence():
    sim = Sim(num_blocks=8, budget=64)
    a = make_seq("a", 7, 6)
    sim.add(a)
    sim.step()
    r = make_remote("r", 23, 2, first_token=5)  # 24 tokens: the 6 free blocks
    sim.add(r)
    assert not sim.step().reserved
    while sim.sched.has_work:
        for x in sim.step().reserved:
            sim.land_remote_kv(x)
            sim.sched.activate(x)
        assert len(sim.steps) < 100
    assert sim.sched.stats.num_preemptions == 0
    assert len(r.output_token_ids) == 2 and a.is_finished


def test_the_watermark_never_keeps_out_a_lone_request_that_fits():
    # Nothing runs: the request may take every block (a watermark then would refuse it for ever).
    sim = Sim(num_blocks=4, budget=64)
    a = make_seq("a", 16, 1)
    sim.add(a)
    assert sim.step().admitted == [a]
    sim.run()
    # And one that can never fit still fails at once, with its reason, rather than waiting.
    big = make_seq("big", 17, 1)
    sim.add(big)
    out = sim.sched.schedule()
    assert [(s, "can never fit" in why) for s, why in out.failed] == [(big, True)]
    assert not sim.sched.has_work


# --- prefill-side backpressure -----------------------------------------------------------------


def test_a_prefill_whose_kv_reader_is_behind_is_held_back_while_others_run():
    """On a prefill worker, a request whose reader (the decode worker) is slow piled its whole
    prompt's KV up in host memory. While `kv_backlogged()` says so, its next chunk waits; the other
    sequences run, and take the budget it leaves."""
    sim = Sim(num_blocks=64, budget=8)
    backlogged = [False]
    slow = make_seq("slow", 40, 1)
    slow.kv_backlogged = lambda: backlogged[0]
    other = make_seq("other", 30, 2)
    sim.add(slow, other)
    out = sim.step()
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(slow, 8)]
    backlogged[0] = True
    for _ in range(3):
        out = sim.step()
        assert chunk_of(out, slow) is None, "computed more KV for a reader that is behind"
        assert chunk_of(out, other).num_tokens == 8
    assert slow.num_computed_tokens == 8
    # With nothing else to run the step is empty (the engine loop then waits to be woken).
    while not other.is_finished:
        sim.step()
    assert sim.sched.schedule().is_empty and slow.num_computed_tokens == 8
    backlogged[0] = False
    sim.run()
    assert slow.is_finished and len(slow.output_token_ids) == 1
