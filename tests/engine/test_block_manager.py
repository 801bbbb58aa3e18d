"""`BlockManager` on its own: allocation, refcounts, the prefix cache and LRU eviction. Pure Python."""

from __future__ import annotations

import math
import random

import pytest

from tandem_worker.engine.block_manager import BlockManager
from tandem_worker.engine.sampling_params import SamplingParams
from tandem_worker.engine.sequence import Sequence

BS = 4


def make_seq(tokens: list[int], rid: str) -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams())


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """Pretend the model computed every token of `seq` and publish its full blocks."""
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def admit_all(bm: BlockManager, seq: Sequence) -> None:
    assert bm.admit(seq, seq.num_tokens)


def probe_cached_tokens(bm: BlockManager, tokens: list[int], rid: str = "probe") -> int:
    """How many tokens a new sequence with `tokens` would get from the cache (admits, then frees it)."""
    probe = make_seq(tokens, rid)
    assert bm.admit(probe, 1)
    cached = probe.num_cached_tokens
    bm.free(probe)
    bm.forget(probe)
    return cached


def referenced_blocks(*seqs: Sequence) -> list[int]:
    return sorted(b for s in seqs for b in s.block_table)


# --- allocation and refcounts ------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 5, 8, 9, 16, 17])
def test_admit_allocates_ceil_blocks(num_tokens):
    bm = BlockManager(num_blocks=10, block_size=BS)
    seq = make_seq(list(range(num_tokens)), "a")
    assert bm.admit(seq, num_tokens)
    expected = math.ceil(num_tokens / BS)
    assert len(seq.block_table) == expected
    assert len(set(seq.block_table)) == expected
    assert all(bm.ref_counts[b] == 1 for b in seq.block_table)
    assert sum(bm.ref_counts) == expected
    assert bm.num_free_blocks == 10 - expected
    assert seq.num_computed_tokens == 0 and seq.num_cached_tokens == 0


def test_admit_a_chunk_allocates_only_for_the_chunk():
    bm = BlockManager(num_blocks=10, block_size=BS)
    seq = make_seq(list(range(20)), "a")
    assert bm.admit(seq, 6)  # a 6-token first chunk of a 20-token prompt
    assert len(seq.block_table) == 2
    assert bm.num_free_blocks == 8
    # The rest arrives block by block.
    seq.num_computed_tokens = 6
    assert bm.grow(seq, 2)
    assert len(seq.block_table) == 2  # 8 tokens still fit in 2 blocks
    assert bm.grow(seq, 3)
    assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 7


def test_grow_failure_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=BS)
    seq = make_seq(list(range(8)), "a")
    admit_all(bm, seq)
    compute_all(bm, seq)
    table = list(seq.block_table)
    assert not bm.grow(seq, 5)  # needs 2 more blocks, 1 is free
    assert seq.block_table == table
    assert bm.num_free_blocks == 1
    assert not bm.can_grow(seq, 5)
    assert bm.can_grow(seq, 4)


def test_free_returns_every_block():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a, b = make_seq(list(range(10)), "a"), make_seq(list(range(100, 107)), "b")
    admit_all(bm, a)
    admit_all(bm, b)
    assert bm.num_free_blocks == 1
    assert set(a.block_table).isdisjoint(b.block_table)
    bm.free(a)
    assert a.block_table == [] and a.num_computed_tokens == 0
    assert bm.num_free_blocks == 4
    bm.free(b)
    assert bm.num_free_blocks == 6
    assert bm.ref_counts == [0] * 6


def test_admit_failure_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(list(range(12)), "a")
    admit_all(bm, a)  # 3 of 4 blocks
    refs, stats = list(bm.ref_counts), bm.stats()
    b = make_seq(list(range(100, 108)), "b")  # needs 2
    assert not bm.admit(b, 8)
    assert b.block_table == []
    assert b.num_computed_tokens == 0 and b.num_cached_tokens == 0
    assert bm.num_free_blocks == 1
    assert bm.ref_counts == refs
    assert bm.stats() == stats
    # Still admittable once room appears.
    bm.free(a)
    assert bm.admit(b, 8)
    assert len(b.block_table) == 2


def test_admit_failure_with_cached_hits_changes_nothing():
    """A refused admission must not take references on the evictable blocks it would have hit."""
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(list(range(9)), "a")
    admit_all(bm, a)
    compute_all(bm, a)
    bm.free(a)  # 2 hashed blocks evictable, 2 free
    hog = make_seq(list(range(100, 106)), "hog")
    admit_all(bm, hog)  # takes the 2 never-used blocks
    assert bm.stats().num_cached == 2
    refs, stats, evictions = list(bm.ref_counts), bm.stats(), bm.num_evictions
    # 2 cached blocks hit + 2 fresh blocks needed > 2 allocatable.
    b = make_seq(list(range(8)) + [50, 51, 52, 53, 54], "b")
    assert not bm.admit(b, b.num_tokens)
    assert b.block_table == [] and b.num_cached_tokens == 0 and b.num_computed_tokens == 0
    assert bm.ref_counts == refs
    assert bm.stats() == stats
    assert bm.num_evictions == evictions
    # The cache survived the refusal.
    bm.free(hog)
    assert probe_cached_tokens(bm, list(range(9))) == 8


def test_double_free_asserts():
    bm = BlockManager(num_blocks=4, block_size=BS)
    seq = make_seq(list(range(6)), "a")
    admit_all(bm, seq)
    table = list(seq.block_table)
    bm.free(seq)
    seq.block_table = table  # a stale owner of the same blocks frees them again
    with pytest.raises(AssertionError, match="freed twice"):
        bm.free(seq)


def test_no_blocks_is_rejected():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=BS)


# --- prefix cache ------------------------------------------------------------------------------


def test_second_sequence_shares_full_prefix_blocks():
    bm = BlockManager(num_blocks=10, block_size=BS)
    prefix = list(range(8))
    a = make_seq(prefix + [8, 9], "a")
    admit_all(bm, a)
    compute_all(bm, a)
    b = make_seq(prefix + [70, 71, 72], "b")
    assert bm.admit(b, b.num_tokens)
    assert b.num_cached_tokens == 8
    assert b.num_computed_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert [bm.ref_counts[x] for x in b.block_table[:2]] == [2, 2]
    # The partial tail block is private to each.
    assert b.block_table[2] != a.block_table[2]
    assert bm.ref_counts[b.block_table[2]] == 1
    assert bm.num_free_blocks == 10 - 4
    bm.free(a)
    assert [bm.ref_counts[x] for x in b.block_table[:2]] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 10
    assert bm.ref_counts == [0] * 10


@pytest.mark.parametrize(
    ("prompt_len", "expected_cached"), [(4, 0), (5, 4), (8, 4), (9, 8), (12, 8), (13, 12)]
)
def test_cache_hit_always_leaves_a_token_to_compute(prompt_len, expected_cached):
    bm = BlockManager(num_blocks=10, block_size=BS)
    tokens = list(range(prompt_len))
    a = make_seq(tokens, "a")
    admit_all(bm, a)
    compute_all(bm, a)
    b = make_seq(tokens, "b")
    assert bm.admit(b, b.num_tokens)
    assert b.num_cached_tokens == expected_cached
    assert b.num_cached_tokens % BS == 0
    assert b.num_tokens - b.num_computed_tokens >= 1
    # Room was made for exactly the tokens still to compute.
    assert len(b.block_table) == math.ceil(prompt_len / BS)


def test_freed_hashed_blocks_stay_hittable():
    bm = BlockManager(num_blocks=6, block_size=BS)
    tokens = list(range(10))
    a = make_seq(tokens, "a")
    admit_all(bm, a)
    compute_all(bm, a)
    full_blocks = a.block_table[:2]
    bm.free(a)
    s = bm.stats()
    assert s.num_free == 6 and s.num_used == 0
    assert s.num_cached == 2  # the 2 full blocks; the partial tail carries no hash
    b = make_seq(tokens + [99], "b")
    assert bm.admit(b, b.num_tokens)
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == full_blocks
    assert [bm.ref_counts[x] for x in full_blocks] == [1, 1]
    assert bm.stats().num_cached == 0  # referenced again, so no longer evictable
    assert bm.num_evictions == 0


def test_fresh_blocks_are_used_before_evicting_cached_ones():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_seq(list(range(8)) + [8], "a")
    admit_all(bm, a)
    compute_all(bm, a)
    bm.free(a)  # 2 evictable, 4 never used
    other = make_seq(list(range(100, 116)), "other")  # exactly the 4 never-used blocks
    admit_all(bm, other)
    assert bm.num_evictions == 0
    assert bm.stats().num_cached == 2
    bm.free(other)  # uncommitted: back to plain free blocks
    assert probe_cached_tokens(bm, list(range(8)) + [8]) == 8
    assert bm.num_evictions == 0


def test_eviction_is_lru_across_sequences_and_tail_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a_tokens, b_tokens = [1, 2, 3, 4, 5], [11, 12, 13, 14, 15]  # 2 full blocks + a partial one each
    a, b = make_seq(a_tokens, "a"), make_seq(b_tokens, "b")
    for s in (a, b):
        admit_all(bm, s)
        compute_all(bm, s)
    bm.free(a)  # a is the least recently used
    bm.free(b)
    assert bm.stats().num_cached == 4 and bm.num_free_blocks == 6

    # 3 fresh blocks: 2 never-used ones, then 1 eviction: a's tail block.
    c = make_seq([21, 22, 23, 24, 25, 26], "c")
    admit_all(bm, c)
    assert bm.num_evictions == 1
    bm.free(c)  # uncommitted, returns to the plain free list
    assert probe_cached_tokens(bm, a_tokens, "pa") == 2  # a's head survives, its tail is gone
    assert probe_cached_tokens(bm, b_tokens, "pb") == 4  # b untouched
    assert bm.num_evictions == 1


def test_evicting_the_head_breaks_the_chain():
    bm = BlockManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    a = make_seq(tokens, "a")
    admit_all(bm, a)
    compute_all(bm, a)
    head, tail = a.block_table[0], a.block_table[1]
    bm.free(a)  # the tail becomes evictable before the head
    # Every plain block and then both cached ones: the tail is evicted first, then the head.
    hog = make_seq(list(range(100, 108)), "hog")  # 4 blocks: 2 plain free + tail + head
    admit_all(bm, hog)
    assert bm.num_evictions == 2
    assert {head, tail} <= set(hog.block_table)
    bm.free(hog)
    assert probe_cached_tokens(bm, tokens) == 0


def test_reusing_cached_block_refreshes_its_recency():
    bm = BlockManager(num_blocks=5, block_size=2)
    a_tokens, b_tokens = [1, 2, 3], [11, 12, 13]
    for rid, toks in (("a", a_tokens), ("b", b_tokens)):
        s = make_seq(toks, rid)
        admit_all(bm, s)
        compute_all(bm, s)
        bm.free(s)
    # a is older, but hitting it again makes b the least recently used.
    assert probe_cached_tokens(bm, a_tokens, "pa") == 2
    hog = make_seq(list(range(100, 108)), "hog")  # 3 plain free + 1 eviction
    admit_all(bm, hog)
    assert bm.num_evictions == 1
    bm.free(hog)
    assert probe_cached_tokens(bm, a_tokens, "pa2") == 2
    assert probe_cached_tokens(bm, b_tokens, "pb") == 0


@pytest.mark.parametrize(
    ("changed_index", "expected_cached"), [(0, 0), (3, 0), (4, 4), (7, 4), (8, 8), (11, 8)]
)
def test_one_changed_token_breaks_the_chain_from_its_block(changed_index, expected_cached):
    bm = BlockManager(num_blocks=12, block_size=BS)
    tokens = list(range(13))  # 3 full blocks + 1
    a = make_seq(tokens, "a")
    admit_all(bm, a)
    compute_all(bm, a)
    other = list(tokens)
    other[changed_index] = 999
    b = make_seq(other, "b")
    assert bm.admit(b, b.num_tokens)
    # Later blocks are identical token-wise but must not hit: a block's key covers its whole prefix.
    assert b.num_cached_tokens == expected_cached
    assert b.block_table[: expected_cached // BS] == a.block_table[: expected_cached // BS]


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    tokens = list(range(13))
    a = make_seq(tokens, "a")
    admit_all(bm, a)
    compute_all(bm, a)
    b = make_seq(tokens, "b")
    assert bm.admit(b, b.num_tokens)  # a still holds its blocks
    assert b.num_cached_tokens == 0 and b.num_computed_tokens == 0
    assert set(a.block_table).isdisjoint(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.stats().num_cached == 0
    assert probe_cached_tokens(bm, tokens) == 0
    assert bm.num_free_blocks == 8


def test_commit_publishes_only_fully_computed_blocks():
    bm = BlockManager(num_blocks=12, block_size=BS)
    tokens = list(range(14))
    a = make_seq(tokens, "a")
    admit_all(bm, a)
    a.num_computed_tokens = 3
    bm.commit(a)
    assert probe_cached_tokens(bm, tokens, "p0") == 0
    a.num_computed_tokens = 7  # block 0 complete, block 1 not
    bm.commit(a)
    assert probe_cached_tokens(bm, tokens, "p1") == 4
    a.num_computed_tokens = 12
    bm.commit(a)
    assert probe_cached_tokens(bm, tokens, "p2") == 12
    a.num_computed_tokens = 14  # the partial tail block is never published
    bm.commit(a)
    assert probe_cached_tokens(bm, list(range(17)), "p3") == 12
    bm.free(a)
    assert bm.stats().num_cached == 3


def test_commit_covers_generated_tokens():
    """Blocks filled by decoding are published too, so a preempted sequence can resume from them."""
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq([1, 2, 3], "a")
    admit_all(bm, seq)
    compute_all(bm, seq)
    for tok in (4, 5, 6, 7, 8):  # decode: append a token, grow, compute it
        seq.output_token_ids.append(tok)
        assert bm.grow(seq, 1)
        compute_all(bm, seq)
    # Tokens 1..8 are computed: 2 full blocks, the second made of generated tokens.
    assert probe_cached_tokens(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9]) == 8


def test_concurrent_twins_first_writer_wins():
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(9))
    a, b = make_seq(tokens, "a"), make_seq(tokens, "b")
    admit_all(bm, a)
    admit_all(bm, b)  # admitted before a committed anything: no hits
    assert b.num_cached_tokens == 0
    assert set(a.block_table).isdisjoint(b.block_table)
    assert bm.num_free_blocks == 2
    compute_all(bm, a)
    compute_all(bm, b)  # b computed the same two full blocks
    c = make_seq(tokens + [77], "c")
    assert bm.admit(c, c.num_tokens)
    assert c.num_cached_tokens == 8
    assert c.block_table[:2] == a.block_table[:2]  # the first writer's blocks
    assert all(bm.ref_counts[x] == 1 for x in b.block_table)
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_free_blocks == 8
    assert bm.ref_counts == [0] * 8
    assert bm.stats().num_cached == 2  # only a's blocks are cached; b's twins went back as plain blocks
    # Using the 6 uncached blocks evicts nothing.
    hog = make_seq(list(range(100, 124)), "hog")
    admit_all(bm, hog)
    assert bm.num_evictions == 0
    bm.free(hog)
    assert bm.num_free_blocks == 8


def test_twin_committing_first_is_the_one_cached():
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(9))
    a, b = make_seq(tokens, "a"), make_seq(tokens, "b")
    admit_all(bm, a)
    admit_all(bm, b)
    compute_all(bm, b)
    compute_all(bm, a)
    c = make_seq(tokens, "c")
    assert bm.admit(c, c.num_tokens)
    assert c.block_table[:2] == b.block_table[:2]
    bm.free(b)  # b's blocks survive in use by c; a's twins are plain blocks when freed
    bm.free(a)
    bm.free(c)
    assert bm.num_free_blocks == 8
    assert bm.stats().num_cached == 2


def test_preempted_sequence_resumes_from_its_own_blocks():
    bm = BlockManager(num_blocks=6, block_size=BS)
    seq = make_seq(list(range(10)), "a")
    admit_all(bm, seq)
    compute_all(bm, seq)
    first_two = seq.block_table[:2]
    seq.output_token_ids.append(50)
    bm.free(seq)  # preemption by recompute
    assert bm.admit(seq, seq.num_tokens)
    assert seq.num_cached_tokens == 8
    assert seq.block_table[:2] == first_two
    assert len(seq.block_table) == 3
    bm.free(seq)
    bm.forget(seq)
    assert bm.num_free_blocks == 6


def test_reset_prefix_cache_drops_unreferenced_entries_only():
    bm = BlockManager(num_blocks=8, block_size=BS)
    held, dropped = make_seq(list(range(9)), "held"), make_seq(list(range(100, 109)), "dropped")
    for s in (held, dropped):
        admit_all(bm, s)
        compute_all(bm, s)
    bm.free(dropped)
    bm.reset_prefix_cache()
    assert bm.stats().num_cached == 0
    assert bm.num_free_blocks == 5
    assert probe_cached_tokens(bm, list(range(100, 109)), "p1") == 0
    assert probe_cached_tokens(bm, list(range(9)), "p2") == 8
    bm.free(held)
    assert bm.num_free_blocks == 8


# --- adapter runs (LoRA weights paged in the KV pool) --------------------------------------------


def cache_prompt(bm: BlockManager, tokens: list[int], rid: str) -> Sequence:
    """Compute `tokens` (whole blocks) and publish them; the caller frees the sequence."""
    seq = make_seq(tokens, rid)
    admit_all(bm, seq)
    compute_all(bm, seq)
    return seq


def test_adapter_run_takes_free_blocks_before_evicting_a_cached_prefix():
    """The reviewer's case: the highest unreferenced run held a cached prefix while a free run sat
    lower. Taking it cost half the prefix's hits for no reason."""
    bm = BlockManager(num_blocks=16, block_size=BS)
    private = make_seq(list(range(1000, 1000 + 8 * BS)), "private")
    admit_all(bm, private)  # blocks 0-7, never published
    shared = cache_prompt(bm, list(range(2000, 2000 + 8 * BS)), "shared")  # blocks 8-15
    bm.free(private)
    bm.free(shared)
    bm.forget(shared)
    start = bm.allocate_run(4)
    assert start == 4  # the highest free run: KV keeps the lowest block ids
    assert bm.num_evictions == 0
    assert probe_cached_tokens(bm, list(range(2000, 2000 + 8 * BS)) + [1]) == 8 * BS
    bm.free_run(start, 4)
    assert bm.num_free_blocks == 16


def test_adapter_run_evicts_the_least_recently_used_prefix_when_no_free_run_exists():
    bm = BlockManager(num_blocks=17, block_size=BS)  # block 16: room for the probes' last token
    old_tokens, new_tokens = list(range(3000, 3000 + 8 * BS)), list(range(4000, 4000 + 8 * BS))
    old, new = cache_prompt(bm, old_tokens, "old"), cache_prompt(bm, new_tokens, "new")
    assert old.block_table == list(range(8)) and new.block_table == list(range(8, 16))
    for s in (old, new):  # every block but 16 cached; the old prompt's the least recently used
        bm.free(s)
        bm.forget(s)
    start = bm.allocate_run(4)
    assert bm.num_evictions == 4
    # The old prompt's tail (its least recently used blocks), not the newest prompt at the top.
    assert start == 4
    assert probe_cached_tokens(bm, new_tokens + [1], "pn") == 8 * BS
    assert probe_cached_tokens(bm, old_tokens + [1], "po") == 4 * BS
    # Hitting the old prompt again makes the new one the least recently used.
    bm.free_run(start, 4)
    assert probe_cached_tokens(bm, old_tokens + [1], "po2") == 4 * BS
    start = bm.allocate_run(8)
    assert probe_cached_tokens(bm, old_tokens + [1], "po3") == 4 * BS
    assert probe_cached_tokens(bm, new_tokens + [1], "pn2") < 8 * BS


def test_adapter_run_costs_the_prefix_cache_the_least():
    """Against every candidate run: a free one if any (the highest), else the one whose newest
    cached block is the oldest (then the fewest cached blocks, then the highest)."""
    for seed in range(300):
        rng = random.Random(seed)
        bm = BlockManager(num_blocks=rng.randint(1, 30), block_size=2)
        held: list[Sequence] = []
        for i in range(rng.randint(0, 12)):
            s = make_seq([rng.randint(0, 3) for _ in range(rng.randint(1, 8))], f"s{i}")
            if bm.admit(s, s.num_tokens):
                compute_all(bm, s)
                held.append(s)
            if held and rng.random() < 0.5:
                gone = held.pop(rng.randrange(len(held)))
                bm.free(gone)
                bm.forget(gone)
            if rng.random() < 0.2:
                bm.allocate_run(rng.randint(1, 3))
        n = rng.randint(1, 5)
        age = {b: i for i, b in enumerate(bm._evictable, 1)}
        candidates = [
            (max(age.get(b, 0) for b in range(s, s + n)), sum(b in age for b in range(s, s + n)), -s)
            for s in range(bm.num_blocks - n + 1)
            if not any(bm.ref_counts[b] for b in range(s, s + n))
        ]
        expected = -min(candidates)[2] if candidates else None
        free_before = bm.num_free_blocks
        assert bm.allocate_run(n) == expected, f"seed {seed}"
        if expected is not None:
            assert bm.num_free_blocks == free_before - n
            assert all(bm.ref_counts[b] == 1 for b in range(expected, expected + n))
            assert not set(range(expected, expected + n)) & (set(bm._free) | set(bm._evictable))
