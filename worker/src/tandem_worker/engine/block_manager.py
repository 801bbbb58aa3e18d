"""`BlockManager`: the paged KV cache's bookkeeping, pure Python and tensor-free.

Parts:
- a pool of `num_blocks` fixed-size blocks, each with a reference count;
- per-sequence block tables (kept on the `Sequence`);
- the prefix cache: a full block is keyed by a hash of every token up to and including it,
  so two sequences that share a prefix share its blocks (refcounted);
- freed blocks that carry a hash stay cached and are evicted least-recently-used, and
  only when a fresh block is needed;
- contiguous runs of blocks for LoRA adapters (unified paging, see lora.py): KV takes the
  lowest free block ids and adapters the highest free run, so the two rarely fragment each other;
  a run evicts cached prefix blocks only when no free run exists (`allocate_run`).
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from .sequence import Sequence


def cache_slot(block_table: list[int], position: int, block_size: int) -> int:
    """The flat KV cache slot (block * block_size + offset) of one token position."""
    return block_table[position // block_size] * block_size + position % block_size


def cache_slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat KV cache slots (`cache_slot`) of token positions [start, end)."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    """A collision-resistant key for a block given everything before it."""
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass(frozen=True)
class BlockStats:
    num_blocks: int
    num_free: int  # allocatable now: never used, or cached with no reader
    num_cached: int  # evictable blocks that still hold a reusable prefix
    num_used: int  # referenced by at least one sequence, or holding a LoRA adapter
    num_adapter: int = 0  # of num_used: holding LoRA adapter weights


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self._free: list[int] = list(range(num_blocks))  # a min-heap: KV packs low block ids
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        # Per sequence: the hash chain of its full blocks, so hashing stays incremental.
        self._seq_hashes: dict[str, list[bytes]] = {}
        self._seq_committed: dict[str, int] = {}  # full blocks already published, per sequence
        self.num_evictions = 0
        self.num_adapter_blocks = 0

    # --- queries -----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    def stats(self) -> BlockStats:
        free = self.num_free_blocks
        return BlockStats(
            self.num_blocks, free, len(self._evictable), self.num_blocks - free, self.num_adapter_blocks
        )

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks for the longest run of full prompt blocks.

        At least one token is always left to compute: its logits give the next token.
        """
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # (prompt log-probabilities come from computing the prompt's every token)
        bs = self.block_size
        hits: list[int] = []
        hashes = self._seq_hashes.setdefault(seq.request_id, [])
        parent = seq.cache_salt
        for i in range((seq.num_tokens - 1) // bs):
            if i < len(hashes):
                h = hashes[i]
            else:
                h = hash_block(parent, seq.tokens(i * bs, (i + 1) * bs))
                hashes.append(h)
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
            parent = h
        return hits

    # --- allocation --------------------------------------------------------------------------

    def _take_fresh(self) -> int:
        if self._free:
            block = heapq.heappop(self._free)
        else:
            block, _ = self._evictable.popitem(last=False)
            self._unhash(block)
        self.ref_counts[block] = 1
        return block

    def _unhash(self, block: int) -> None:
        old = self.block_hashes[block]
        if old is not None and self.hash_to_block.get(old) == block:
            del self.hash_to_block[old]
        self.block_hashes[block] = None
        self.num_evictions += 1

    def allocate_run(self, n: int) -> int | None:
        """Take `n` consecutive unreferenced blocks; None if no such run exists now.

        The highest run of never-cached (free) blocks, so KV (lowest ids first) and adapters rarely
        fragment each other. Only when no such run exists are cached prefix blocks evicted: from
        the run whose most recently used cached block is the oldest (fewest evicted on a tie), so
        a run costs the prefix cache no block that LRU eviction would have kept longer. Taking the
        highest run regardless evicted hot prefixes while a free run sat lower in the pool.
        The blocks stay out of the KV allocator until `free_run`.
        """
        refs = self.ref_counts
        # Recency of each cached block, 1 = least recently used; free blocks count as 0.
        age = [0] * self.num_blocks
        for i, b in enumerate(self._evictable, 1):
            age[b] = i
        start = None
        best_age = best_cached = self.num_blocks + 1  # of the best run so far
        run = cached = 0
        newest: deque[int] = deque()  # the window's cached blocks by falling id and age: max first
        for b in range(self.num_blocks - 1, -1, -1):
            if refs[b]:
                run = cached = 0
                newest.clear()
                continue
            a = age[b]
            run += 1
            if a:
                cached += 1
                while newest and age[newest[-1]] <= a:
                    newest.pop()
                newest.append(b)
            if run > n:  # block b + n leaves the window [b, b + n)
                if age[b + n]:
                    cached -= 1
                    if newest[0] == b + n:
                        newest.popleft()
            if run >= n:
                if not cached:
                    start = b
                    break  # all free, and the highest such run: nothing beats it
                m = age[newest[0]]
                if m < best_age or (m == best_age and cached < best_cached):
                    best_age, best_cached, start = m, cached, b
        if start is None:
            return None
        taken = range(start, start + n)
        for b in taken:
            if b in self._evictable:
                del self._evictable[b]
                self._unhash(b)
            self.ref_counts[b] = 1
        self._free = [b for b in self._free if not start <= b < start + n]
        heapq.heapify(self._free)
        self.num_adapter_blocks += n
        return start

    def free_run(self, start: int, n: int) -> None:
        for b in range(start, start + n):
            assert self.ref_counts[b] == 1, f"block {b} is not an adapter block"
            self.ref_counts[b] = 0
            heapq.heappush(self._free, b)
        self.num_adapter_blocks -= n

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self._evictable.pop(block, None)
        self.ref_counts[block] += 1

    def admit(self, seq: Sequence, num_new_tokens: int, watermark: int = 0) -> bool:
        """Give a waiting sequence its cached prefix and room for `num_new_tokens` more, leaving at
        least `watermark` blocks free.

        Sets `seq.block_table` and `seq.num_computed_tokens`; on False nothing changed.
        """
        assert not seq.block_table, "admit() is for sequences holding no blocks"
        hits = self._prefix_hits(seq)
        cached_tokens = len(hits) * self.block_size
        num_new_tokens = min(num_new_tokens, seq.num_tokens - cached_tokens)
        needed = self.blocks_needed(cached_tokens + num_new_tokens) - len(hits)
        reclaimed = sum(1 for b in hits if self.ref_counts[b] == 0)
        if needed + reclaimed + watermark > self.num_free_blocks:
            return False
        for b in hits:
            self._ref(b)
        seq.block_table = hits + [self._take_fresh() for _ in range(needed)]
        seq.num_computed_tokens = cached_tokens
        if seq.num_preemptions == 0:
            # What usage reports as the prompt's cache hits: a preempted request's re-admission
            # also hits its own prompt and output, which it computed itself.
            seq.num_cached_tokens = min(cached_tokens, seq.num_prompt_tokens)
        return True

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= self.num_free_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more KV entries; on False nothing changed.

        A table only ever grows by appending (or is replaced by `admit`/`free`): DecodeGraphs
        rewrites a table's row of its input buffer only when the table or its length changed."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_fresh())
        return True

    def commit(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        hashes = self._seq_hashes.setdefault(seq.request_id, [])
        num_full = seq.num_computed_tokens // bs
        start = self._seq_committed.get(seq.request_id, 0)
        for i in range(start, num_full):
            if i == len(hashes):
                parent = hashes[i - 1] if i else seq.cache_salt
                hashes.append(hash_block(parent, seq.tokens(i * bs, (i + 1) * bs)))
            block = seq.block_table[i]
            if self.block_hashes[block] is not None:
                continue
            h = hashes[i]
            # First writer wins: a twin computed concurrently stays private and is freed normally.
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block
                self.block_hashes[block] = h
        self._seq_committed[seq.request_id] = max(start, num_full)

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; its cached blocks become evictable, tail first."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                if self.block_hashes[block] is not None:
                    self._evictable[block] = None
                else:
                    heapq.heappush(self._free, block)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._seq_committed.pop(seq.request_id, None)

    def forget(self, seq: Sequence) -> None:
        """Drop per-sequence hash state once the sequence is gone for good."""
        self._seq_hashes.pop(seq.request_id, None)
        self._seq_committed.pop(seq.request_id, None)

    def reset_prefix_cache(self) -> None:
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self.block_hashes[block] = None
            heapq.heappush(self._free, block)
        self.hash_to_block = {h: b for h, b in self.hash_to_block.items() if self.ref_counts[b] > 0}
