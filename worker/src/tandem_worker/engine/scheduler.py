"""`Scheduler`: iteration-level (continuous) batching under a per-step token budget.

Each `schedule()` call decides one model step:
- running sequences go first, oldest first: a decode takes one token, an unfinished
  (chunked) prefill takes what is left of the budget but a token for each decode behind it,
  so a long prompt never stalls the running decodes for more than one chunk;
- on a prefill worker, a running prefill whose KV waits for a slow reader beyond its limit
  (`Sequence.kv_backlogged`) is held back for the step, taking nothing; the others run. So is a
  preempted one waiting to be re-admitted: it keeps its place at the front of the queue, and the
  requests behind it go ahead until its reader catches up;
- then waiting sequences are admitted first-come-first-served while the budget, the
  sequence limit and free KV blocks allow; the head of the queue is never skipped, so
  no request starves. An admission leaves a free block for each sequence holding KV (the
  watermark): taking the blocks running decodes need for their next tokens preempted the
  newcomer a step later, its work thrown away. With nothing running the watermark is 0, so a
  request that fits the cache alone is always admitted (and one that never fits fails);
- when a running sequence needs a block and none is free, the most recently admitted
  sequence is preempted by recompute: its blocks are freed (full ones stay in the prefix
  cache) and it goes back to the front of the queue;
- on a decode worker, a request whose prompt KV comes from a prefill worker first waits in
  `awaiting` until blocks for its whole prompt can be reserved (admission control where memory
  is scarce); it then sits in `reserved`, never scheduled nor preempted, until `activate()`.
  Such arrivals are reserved for before the waiting sequences, unless a preempted one heads the
  queue: then it goes first, and they wait while it waits for room;
- a request for a LoRA adapter is admitted only once its adapter is on the device, and pins it
  there until it finishes or is preempted; unpinned adapters give their blocks back before any
  running sequence is preempted for room. While an adapter is read from the store (bounded by a
  timeout) the requests behind it go ahead; one that cannot load fails its requests. The same
  holds while a resident adapter's replaced files are read and the requests still running on its
  old version finish (only requests that computed with that version may pin it again; see
  LoRAManager.acquire). While an adapter finds no room on the device (the pool is held by running
  requests' KV and pinned adapters), the requests behind it that need no new room (the base model,
  resident adapters) go ahead, but only for `adapter_wait_steps` steps of that request's wait:
  then the queue stops behind it until room frees, so it cannot starve. A request that cannot be
  admitted, or grow, even with nothing else holding KV (its KV and its adapter exceed the pool)
  fails instead of waiting.
The decisions are bookkeeping over `BlockManager` and the LoRA manager; no tensors here.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from .lora import LoRAManager

log = logging.getLogger(__name__)


# Steps a request whose adapter has no room on the device lets the queue behind it go ahead: a
# second or so of decode steps on a GPU. Longer, and a stream of requests for resident adapters
# could keep it waiting for as long as it lasts; shorter, and one big adapter stalls everyone.
ADAPTER_WAIT_STEPS = 64


@dataclass(slots=True)  # not frozen: one is made per sequence per step, and frozen costs 3x
class ScheduledChunk:
    """`num_tokens` tokens of `seq` starting at `start` get their KV computed this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def completes(self) -> bool:
        """The chunk reaches the sequence's last token, so the step samples a new one."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    reserved: list[Sequence] = field(default_factory=list)  # remote-KV sequences that got their blocks
    failed: list[tuple[Sequence, str]] = field(default_factory=list)  # e.g. their adapter cannot load
    # Passed over while their adapter is read from the store, within its load timeout: what they
    # wait for may still come, so the engine is not stuck (see EngineLoop.progress).
    loading: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_chunked_prefill_steps: int = 0  # chunks that did not finish their prompt
    num_prefill_tokens_computed: int = 0
    num_prefix_cached_tokens: int = 0
    num_decode_tokens: int = 0


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        adapters: LoRAManager | None = None,
        adapter_wait_steps: int = ADAPTER_WAIT_STEPS,
        watermark_blocks_per_seq: int = 1,
    ) -> None:
        self.bm = block_manager
        self.adapters = adapters
        self.adapter_wait_steps = adapter_wait_steps
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order, oldest first
        self.awaiting: deque[Sequence] = deque()  # remote KV: waiting for blocks
        self.reserved: dict[str, Sequence] = {}  # remote KV: blocks reserved, KV in transit
        # Free blocks an admission leaves for each sequence holding KV (see `watermark`); 0: none.
        self.watermark_blocks_per_seq = watermark_blocks_per_seq
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        (self.awaiting if seq.remote_kv else self.waiting).append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.awaiting or self.reserved)

    @property
    def has_schedulable_work(self) -> bool:
        return bool(self.waiting or self.running or self.awaiting)

    def activate(self, seq: Sequence) -> None:
        """A reserved sequence's prompt KV is in place: it joins the running batch."""
        del self.reserved[seq.request_id]
        seq.remote_kv = False
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self.bm.commit(seq)

    def _acquire(self, seq: Sequence, queue: deque[Sequence], out: SchedulerOutput) -> bool:
        """Pin the sequence's adapter on the device; False to wait (loading, or no room yet)."""
        if seq.lora_name is None or seq.lora_slot is not None:
            return True
        assert self.adapters is not None, "a LoRA request reached an engine without adapters"
        name = seq.lora_name
        # Work computed with the adapter's version in memory that a restart could not take back:
        # while that version is being replaced (its files changed on disk), such a request may
        # still pin it, and every other one waits for the new version (LoRAManager.acquire).
        streamed = seq.kv_sink is not None and seq.num_preemptions > 0
        try:
            slot = self.adapters.acquire(
                name, keep_version=bool(seq.output_token_ids) or streamed, waiting_since=seq.arrival_time
            )
        except Exception as e:  # noqa: BLE001 - whatever its adapter does fails this request, not the engine
            why = str(e)  # AdapterError, AdapterNotFoundError: they say what is wrong
            if not isinstance(e, ValueError):
                log.exception("acquiring adapter %r for request %s failed", name, seq.request_id)
                why = f"adapter {name!r} could not be loaded: {type(e).__name__}: {e}"
            queue.popleft()
            out.failed.append((seq, why))
            return True
        if slot is None:
            return False
        seq.lora_slot = slot
        salt = self.adapters.cache_salt(name)
        if seq.cache_salt != salt:
            # The adapter's files changed on disk since the request took its salt (see
            # LoRAManager.cache_salt). While nothing of the old weights' work has left the engine,
            # no token sampled and no KV streamed to a decode worker, it starts over with the
            # weights there now, so its whole answer comes from one adapter: never admitted, or
            # preempted mid-prefill (holding no blocks, it recomputes its prompt anyway). A
            # preempted prefill-worker request (kv_sink) has streamed part of its prompt's KV.
            # Otherwise part of its answer came from the old weights.
            if not seq.output_token_ids and not streamed:
                seq.cache_salt = salt
                self.bm.forget(seq)  # hashes chained from the old salt
                # Started over: its next admission's hits are other requests' KV under the new
                # salt, which usage reports as its prompt's cached tokens (see BlockManager.admit).
                seq.num_preemptions = 0
            else:
                self._release(seq)
                queue.popleft()
                out.failed.append((seq, f"adapter {name!r} changed while this request ran; send it again"))
        return True

    def _adapter_loading(self, seq: Sequence) -> bool:
        return (
            seq.lora_name is not None
            and seq.lora_slot is None
            and self.adapters is not None
            and self.adapters.is_loading(seq.lora_name)
        )

    def _admit_from(
        self,
        queue: deque[Sequence],
        out: SchedulerOutput,
        has_room: Callable[[], bool],
        admit: Callable[[Sequence], bool],
    ) -> bool:
        """Admit from the front of `queue` while `has_room()`: first come first served, each with
        its adapter pinned, through `admit` (False: no KV room, and the queue stops there).
        True if the queue stopped behind a request waiting for room (KV, or its adapter's).

        Passed over, keeping their place at the front: preempted prefills whose KV reader is still
        behind (`Sequence.kv_backlogged`); requests whose adapter is being read; one whose adapter
        finds no room on the device, for `adapter_wait_steps` steps of its wait (then the queue
        stops behind it); and behind such a one, requests whose adapter would need room too. So
        what goes ahead of a request waiting for room takes none of the room it waits for but KV,
        and the host cache is not churned by reads for adapters that could not run."""
        passed: list[Sequence] = []
        blocked = stalled = False
        while queue and has_room():
            seq = queue[0]
            if blocked and self._needs_room(seq):
                passed.append(queue.popleft())
                continue
            if seq.kv_backlogged is not None and seq.kv_backlogged():
                # Preempted while its reader was behind (a new request has sent nothing). Re-admitted,
                # its first chunk computed KV past the limit, again at each preemption (the newest
                # admission is the next victim), and took blocks it could not use. Stopping the
                # queue behind it instead would let one slow reader stall every request.
                passed.append(queue.popleft())
                continue
            if not self._acquire(seq, queue, out):
                if self._adapter_loading(seq):
                    out.loading.append(seq)
                else:  # no room (the read may have just started)
                    if seq.num_adapter_waits >= self.adapter_wait_steps:
                        stalled = True
                        break
                    seq.num_adapter_waits += 1
                    blocked = True
                passed.append(queue.popleft())
                continue
            if out.failed and out.failed[-1][0] is seq:
                continue  # its adapter cannot load: _acquire took it off the queue
            if not admit(seq):
                self._release(seq)
                if self.running or self.reserved:
                    stalled = True
                    break  # they free room as they finish
                # Nothing else holds KV, and every adapter but its own has been evicted for it: it
                # will never fit (its adapter was not in memory when it arrived, to refuse it then).
                queue.popleft()
                out.failed.append((seq, self._never_fits(seq)))
                continue
            queue.popleft()
            if seq.num_preemptions == 0:  # a re-admission's hits are its own earlier work
                self.stats.num_prefix_cached_tokens += seq.num_cached_tokens
        queue.extendleft(reversed(passed))
        return stalled

    def _never_fits(self, seq: Sequence) -> str:
        bm = self.bm
        beside = ""
        if seq.lora_name is not None and self.adapters is not None:
            blocks = self.adapters.num_blocks(seq.lora_name)
            beside = f" beside adapter {seq.lora_name!r}" + (
                f", which takes {blocks} of them" if blocks else ""
            )
        return (
            f"{seq.num_prompt_tokens} prompt tokens + {seq.params.max_tokens} max_tokens can never fit "
            f"in the KV cache ({bm.num_blocks} blocks of {bm.block_size} tokens){beside}; shorten the "
            f"request or raise the KV cache budget"
        )

    def _needs_room(self, seq: Sequence) -> bool:
        return (
            seq.lora_name is not None
            and seq.lora_slot is None
            and not self.adapters.is_resident(seq.lora_name)
        )

    def _release(self, seq: Sequence) -> None:
        if seq.lora_slot is not None and self.adapters is not None:
            self.adapters.release(seq.lora_name)
        seq.lora_slot = None

    def watermark(self) -> int:
        """Free blocks an admission must leave: one per sequence already holding KV, what each
        running one may take in its next step or so (a decode takes one block every block_size
        tokens). In simulated thrashing pools it cut the tokens recomputed after preemption by
        28-97% for 0.6-2.3% more steps (fewer sequences share each step); vLLM's 1% of the pool
        saved much less, two blocks a sequence more but for up to 6% more steps. 0 when nothing
        holds KV, so it never keeps a request out for good."""
        return self.watermark_blocks_per_seq * (len(self.running) + len(self.reserved))

    def _admit(self, seq: Sequence, num_new_tokens: int) -> bool:
        """BlockManager.admit above the watermark, first reclaiming blocks from adapters nobody runs."""
        watermark = self.watermark()
        while not self.bm.admit(seq, num_new_tokens, watermark):
            if self.adapters is None or not self.adapters.evict_one(keep=seq.lora_name):
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self._release(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Once per running sequence per step (hundreds on a GPU): bound methods looked up once.
        running, grow, add = self.running, self.bm.grow, out.chunks.append
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            if seq.kv_backlogged is not None and seq.kv_backlogged():
                i += 1  # its reader is behind: no more of its KV until it catches up
                continue
            n = seq.num_uncomputed_tokens
            if n > 1:
                # A (chunked) prefill leaves a token to each decode behind it: remote-KV arrivals
                # join `running` behind a recompute, and would stall until its prompt was done.
                behind = sum(1 for s in running[i + 1 :] if s.num_uncomputed_tokens == 1)
                n = min(n, max(1, budget - behind))
            else:
                n = min(n, budget)
            while not grow(seq, n):
                if self.adapters is not None and self.adapters.evict_one():
                    continue
                victim = running.pop()
                if victim is seq and not running and not self.reserved:
                    # Alone, with every other adapter evicted, it still cannot grow: preempted it
                    # would be admitted again and come back here, every step, for ever.
                    self._release(seq)
                    self.bm.free(seq)
                    out.failed.append((seq, self._never_fits(seq)))
                    break
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                add(ScheduledChunk(seq, seq.num_computed_tokens, n))
                budget -= n
                i += 1

        # Remote-KV arrivals reserve their whole prompt now; the KV lands while others compute.
        def reserve(seq: Sequence) -> bool:
            if not self._admit(seq, seq.num_tokens):
                return False
            self.reserved[seq.request_id] = seq
            out.reserved.append(seq)
            return True

        # Admitting while preempting would only thrash: new arrivals wait for the next step.
        def has_seq_room() -> bool:
            return not out.preempted and len(self.running) + len(self.reserved) < self.max_num_seqs

        # First come first served across the two queues: a preempted request (older than any
        # arrival behind it, and mid-answer) goes before the remote-KV arrivals, which wait while it
        # waits for room. Reserving for arrivals first took the blocks it waited for, step after
        # step: under a steady stream of arrivals it never ran again.
        preempted_first = bool(self.waiting) and self.waiting[0].num_preemptions > 0
        if not preempted_first:
            self._admit_from(self.awaiting, out, has_seq_room, reserve)

        def start(seq: Sequence) -> bool:
            nonlocal budget
            if not self._admit(seq, budget):
                return False
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.admitted.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
            return True

        stalled = self._admit_from(self.waiting, out, lambda: budget > 0 and has_seq_room(), start)
        if preempted_first and not stalled:
            self._admit_from(self.awaiting, out, has_seq_room, reserve)
        return out

    def on_step_done(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts and publish completed blocks to the prefix cache."""
        self.stats.num_steps += 1
        for chunk in out.chunks:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            if chunk.completes and seq.output_token_ids and chunk.num_tokens == 1:
                self.stats.num_decode_tokens += 1
            else:
                self.stats.num_prefill_tokens_computed += chunk.num_tokens
                if not chunk.completes:
                    self.stats.num_chunked_prefill_steps += 1
            self.bm.commit(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.awaiting:
            self.awaiting.remove(seq)
        self.reserved.pop(seq.request_id, None)
        self._release(seq)
        self.bm.free(seq)
        self.bm.forget(seq)
        seq.status = SequenceStatus.FINISHED
