"""A prefill worker's preempted request is re-admitted only once its KV reader has caught up.

The scheduler holds back a running prefill's next chunk while its KV waits for a slow reader
beyond its limit (`Sequence.kv_backlogged`). A prefill preempted meanwhile went back to the queue
and, re-admitted, computed its next chunk anyway: KV past the limit, again at every preemption
(the newest admission is the next victim), for a reader that was not reading.
"""

from __future__ import annotations

from tests.engine.test_scheduler import Sim, chunk_of, make_seq


def test_a_preempted_prefill_whose_reader_is_behind_waits_and_lets_the_queue_pass():
    sim = Sim(num_blocks=6, budget=8)
    backlogged = [False]
    decode = make_seq("decode", 4, 19)  # its prompt and answer fill 5 of the 6 blocks
    slow = make_seq("slow", 12, 1)
    slow.kv_backlogged = lambda: backlogged[0]
    sim.add(decode, slow)
    out = sim.step()
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(decode, 4), (slow, 4)]
    backlogged[0] = True  # its reader has read nothing yet
    while not slow.num_preemptions:  # the decode grows into the block the held-back prefill holds
        assert not decode.is_finished
        out = sim.step()
        assert chunk_of(out, slow) is None, "computed more KV for a reader that is behind"
    assert sim.sched.waiting[0] is slow
    late = make_seq("late", 4, 1)
    sim.add(late)
    while not late.is_finished:
        assert len(sim.steps) < 100, "the queue behind it stalled"
        out = sim.step()
        assert chunk_of(out, slow) is None, "re-admitted and computed more KV for a reader that is behind"
    assert slow.num_computed_tokens == 0 and not slow.block_table
    assert sim.sched.waiting[0] is slow, "it keeps its place at the front of the queue"

    backlogged[0] = False  # the reader caught up
    sim.run()
    assert slow.is_finished and decode.is_finished
