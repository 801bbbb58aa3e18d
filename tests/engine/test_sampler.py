"""`Sampler` on hand-made logits, and `SamplingParams` validation. Tiny CPU tensors only."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tandem_worker.engine.sampler import Sampler
from tandem_worker.engine.sampling_params import RequestError, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def draw(
    sampler: Sampler, logits_row: torch.Tensor, params: SamplingParams, n: int, rid: str = "r"
) -> list[int]:
    """`n` independent draws for one request, in one batched call (one row per draw)."""
    rows = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    return sampler.sample(rows, [f"{rid}{i}" for i in range(n)], [params] * n).token_ids


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


def counts_of(tokens: list[int], vocab: int) -> list[int]:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).tolist()


# --- greedy ------------------------------------------------------------------------------------


def test_greedy_picks_argmax_per_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 37, generator=g)
    logits[2, 36] = 50.0  # argmax at the last position
    logits[4, 0] = 50.0  # and at the first
    res = Sampler().sample(logits, [f"r{i}" for i in range(6)], [GREEDY] * 6)
    assert res.token_ids == logits.argmax(dim=-1).tolist()
    assert res.token_ids[2] == 36 and res.token_ids[4] == 0
    assert res.logprobs is None


def test_greedy_rows_mixed_with_sampled_rows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 20, generator=g)
    sampled = [SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=2.0)]
    params = [GREEDY, sampled[0], GREEDY, sampled[1], GREEDY]
    res = Sampler().sample(logits, [f"r{i}" for i in range(5)], params)
    for i in (0, 2, 4):
        assert res.token_ids[i] == int(logits[i].argmax())
    assert all(0 <= t < 20 for t in res.token_ids)


def test_greedy_accepts_half_precision_logits():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.5]], dtype=torch.float16)
    assert Sampler().sample(logits, ["r"], [GREEDY]).token_ids == [1]


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_1_is_greedy(temperature):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 50, generator=g)
    params = [SamplingParams(temperature=temperature, top_k=1, seed=i) for i in range(64)]
    res = Sampler().sample(logits, [f"r{i}" for i in range(64)], params)
    assert res.token_ids == logits.argmax(dim=-1).tolist()


# --- top-k and top-p ---------------------------------------------------------------------------


def test_top_k_never_samples_outside_the_k_largest():
    vocab, k = 100, 3
    # Nearly flat logits: without top-k, ~97% of draws would land outside the top 3.
    logits = 2.9 - torch.arange(vocab, dtype=torch.float32) * 1e-3
    top = [17, 42, 88]
    logits[top] = torch.tensor([3.0, 2.99, 2.98])
    params = SamplingParams(temperature=1.0, top_k=k)
    tokens = draw(Sampler(seed=0), logits, params, 600)
    assert set(tokens) <= set(top)
    assert set(tokens) == set(top), "all of the top-k should be reachable"
    # Renormalized over the top 3, the three are nearly equally likely.
    c = counts_of(tokens, vocab)
    assert min(c[t] for t in top) > 600 / 3 * 0.7


def test_top_k_of_vocab_minus_one_drops_the_smallest():
    logits = torch.tensor([0.0, 0.1, 0.2, -5.0])
    tokens = draw(Sampler(seed=0), logits, SamplingParams(temperature=3.0, top_k=3), 400)
    assert set(tokens) == {0, 1, 2}  # unfiltered, token 3 would take ~4% of the draws


def test_top_k_larger_than_vocab_is_no_filter():
    logits = torch.zeros(4)
    tokens = draw(Sampler(seed=0), logits, SamplingParams(temperature=1.0, top_k=1000), 200)
    assert set(tokens) == {0, 1, 2, 3}


def test_top_p_never_samples_outside_the_nucleus():
    vocab = 100
    probs = torch.full((vocab,), 0.45 / 98)
    nucleus = [63, 7]  # the two most likely tokens, placed away from the front
    probs[63], probs[7] = 0.30, 0.25
    logits = probs.log()
    # Sorted mass before each token: 0, 0.30, 0.55, ... -> top_p=0.5 keeps exactly {63, 7}.
    params = SamplingParams(temperature=1.0, top_p=0.5)
    tokens = draw(Sampler(seed=0), logits, params, 800)
    assert set(tokens) == set(nucleus)
    c = counts_of(tokens, vocab)
    # Renormalized: 0.30 / 0.55 = 0.545 vs 0.455.
    assert chi_square([c[63], c[7]], [0.30 / 0.55, 0.25 / 0.55]) < 13.8  # p = 0.001, 1 dof


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([5.0, 0.0, 0.0, 0.0])  # p(0) ~ 0.98
    tokens = draw(Sampler(seed=0), logits, SamplingParams(temperature=1.0, top_p=0.01), 100)
    assert set(tokens) == {0}


def test_top_p_applies_after_temperature():
    # At temperature 1 token 0 alone holds > 0.6 of the mass; at temperature 10 it does not.
    logits = torch.tensor([2.0, 0.0, 0.0, 0.0])
    cold = draw(Sampler(seed=0), logits, SamplingParams(temperature=1.0, top_p=0.6), 100)
    hot = draw(Sampler(seed=0), logits, SamplingParams(temperature=10.0, top_p=0.6), 300)
    assert set(cold) == {0}
    assert len(set(hot)) > 1


def test_top_k_and_top_p_combine():
    logits = torch.tensor([3.0, 2.9, 2.8, 2.7, 2.6, 2.5])
    # top_k=4 leaves tokens 0..3 at ~[0.29, 0.26, 0.24, 0.21]; top_p=0.5 then keeps 0 and 1.
    tokens = draw(Sampler(seed=0), logits, SamplingParams(temperature=1.0, top_k=4, top_p=0.5), 400)
    assert set(tokens) == {0, 1}


def test_each_row_of_a_mixed_batch_keeps_its_own_filters_and_temperature():
    # One batched call: rows differ in k, p and temperature, greedy rows among them. Each row's
    # draws follow its own truncated, tempered distribution, not another row's or the batch's.
    vocab = 12
    logits = torch.linspace(3.0, 0.0, vocab)[
        torch.randperm(vocab, generator=torch.Generator().manual_seed(5))
    ]
    rank = logits.argsort(descending=True)  # token ids, most likely first
    cases = [
        (SamplingParams(temperature=1.0, top_k=2), rank[:2]),
        (SamplingParams(temperature=1.0, top_k=5), rank[:5]),
        (SamplingParams(temperature=0.0), rank[:1]),
        (SamplingParams(temperature=2.0), rank),
        (SamplingParams(temperature=1.0, top_k=6, top_p=0.5), None),
        (SamplingParams(temperature=0.5, top_p=0.7, seed=3), None),
    ]
    n = 1500
    params = [c[0] for c in cases for _ in range(n)]
    rows = logits.expand(len(params), -1).contiguous()
    ids = [f"r{i}" for i in range(len(params))]
    # Output positions differ, so the seeded row's draws do too (one seed, one stream of positions).
    tokens = Sampler(seed=2).sample(rows, ids, params, list(range(len(params)))).token_ids
    for j, (p, allowed) in enumerate(cases):
        got = counts_of(tokens[j * n : (j + 1) * n], vocab)
        x = logits / max(p.temperature, 1e-9)
        if p.greedy:
            assert got[int(rank[0])] == n
            continue
        if p.top_k > 0:
            x = x.masked_fill(x < x.topk(p.top_k).values[-1], float("-inf"))
        probs = torch.softmax(x, -1)
        if allowed is None:  # the nucleus of the tempered, top-k-filtered distribution
            ordered = probs.sort(descending=True)
            keep = ordered.values.cumsum(0) - ordered.values < p.top_p
            allowed = ordered.indices[keep]
        expected = torch.zeros(vocab)
        expected[allowed] = probs[allowed] / probs[allowed].sum()
        assert all(got[t] == 0 for t in range(vocab) if expected[t] == 0), (j, got)
        kept = [t for t in range(vocab) if expected[t] > 0]
        assert chi_square([got[t] for t in kept], [float(expected[t]) for t in kept]) < 30, (j, got)


def test_top_p_from_candidates_equals_top_p_from_a_full_sort(monkeypatch):
    # The nucleus is cut from each row's most likely NUCLEUS_CANDIDATES tokens, or from a sort of
    # the whole row when one row's reaches past them: the same tokens either way, for the same draws.
    from tandem_worker.engine import sampler as sampler_mod

    g = torch.Generator().manual_seed(8)
    for scale, top_p, fits in ((8.0, 0.6, True), (0.3, 0.95, False)):  # peaked, flat
        logits = torch.randn(40, 300, generator=g) * scale
        top8 = torch.softmax(logits, -1).topk(8).values.sum(-1)
        assert bool((top8 >= top_p).all()) == fits  # which path 8 candidates take
        params = [SamplingParams(temperature=1.0, top_p=top_p, seed=i) for i in range(40)]
        ids = [f"r{i}" for i in range(40)]

        def run(candidates: int) -> list[int]:
            monkeypatch.setattr(sampler_mod, "NUCLEUS_CANDIDATES", candidates)
            return Sampler().sample(logits, ids, params, list(range(40))).token_ids  # noqa: B023

        full = run(300)
        assert run(8) == full
        assert len(set(full)) > (5 if fits else 30)


def test_tied_logits_draw_the_same_token_whichever_path_the_batch_took(monkeypatch):
    # bf16 logits tie often. topk (the candidates) and the full sort (taken when any row of the
    # batch needs more candidates) ordered tied tokens differently, so a seeded draw changed
    # with its batch neighbours.
    from tandem_worker.engine import sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "NUCLEUS_CANDIDATES", 64)
    g = torch.Generator().manual_seed(3)
    row = (torch.randn(512, generator=g) * 3).bfloat16().float()  # many exact ties
    flat = torch.zeros(512)  # a neighbour whose nucleus spans more than 64 candidates
    changed = 0
    for seed in range(200):
        p = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        alone = Sampler().sample(row[None].clone(), ["a"], [p], [0]).token_ids[0]
        other = SamplingParams(temperature=1.0, top_p=0.99, seed=1)
        batched = Sampler().sample(torch.stack([row, flat]), ["a", "b"], [p, other], [0, 0]).token_ids[0]
        changed += alone != batched
    assert changed == 0


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_a_top_k_batch_draws_among_its_candidates_the_tokens_the_full_vocabulary_would(monkeypatch, top_p):
    """A batch whose rows all keep a top k draws among each row's k most likely tokens (a softmax
    and a cumulative sum over 50 tokens, not the whole vocabulary): for the same seeds, the same
    tokens as the full path, which a neighbour without top-k makes the batch take; and when the
    k-th value ties past the candidates (bf16 logits), the full path, which keeps every tie."""
    taken: list[bool] = []
    candidates = Sampler._draw_top_k

    def spy(self, *args):
        tokens = candidates(self, *args)
        taken.append(tokens is not None)
        return tokens

    monkeypatch.setattr(Sampler, "_draw_top_k", spy)
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(3, 600, generator=g) * 2.5
    tied = rows[2].bfloat16().float()
    tied[tied >= tied.topk(60).values[-1]] = 9.0  # 60+ tokens tie at the top: past the 50 candidates
    rows[2] = tied
    neighbour = SamplingParams(temperature=0.9, top_p=top_p, seed=7)
    drawn = set()
    for seed in range(150):
        params = [
            SamplingParams(temperature=0.7, top_k=k, top_p=top_p, seed=seed + 1000 * j)
            for j, k in enumerate((50, 3, 5))
        ]
        alone = Sampler().sample(rows.clone(), ["a", "b", "c"], params, [seed] * 3).token_ids
        both = torch.cat([rows, rows[:1]])
        full = Sampler().sample(both, ["a", "b", "c", "d"], [*params, neighbour], [seed] * 4).token_ids
        assert alone == full[:3], seed
        drawn.add(tuple(alone))
        # Row by row: the two untied rows alone take the candidates; the tied one does not.
        one = Sampler().sample(rows[:2].clone(), ["a", "b"], params[:2], [seed] * 2).token_ids
        assert one == alone[:2]
    # The full batches never try the candidates (a row without top-k); the tied ones give up.
    assert taken.count(True) == 150 and taken.count(False) == 150
    assert len(drawn) > 100  # the draws do vary with the seed
    kept = set(rows[0].topk(50).indices.tolist())
    assert {t[0] for t in drawn} <= kept


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("top_k", [0, 5])
def test_non_finite_logits_still_draw_a_token_of_the_vocabulary(top_p, top_k):
    # An overflowing model's NaN or +inf made softmax NaN and the draw land on id == vocab, which
    # failed the whole batch at the next step's embedding lookup.
    vocab = 50
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(0))
    nan_one, inf_one = base.clone(), base.clone()
    nan_one[7], inf_one[31] = float("nan"), float("inf")
    rows = torch.stack(
        [torch.full((vocab,), float("nan")), nan_one, inf_one, torch.full((vocab,), -math.inf)]
    )
    params = [
        SamplingParams(temperature=1.0, top_p=top_p, top_k=top_k, seed=i, logprobs=True) for i in range(4)
    ]
    got = Sampler().sample(rows, list("abcd"), params, [0] * 4).token_ids
    assert all(0 <= t < vocab for t in got)
    assert got[1] != 7  # NaN is never drawn
    assert got[2] == 31  # +inf is certain


@pytest.mark.parametrize("u", [0.0, 1.0])
def test_draws_at_the_ends_of_the_unit_interval_land_on_allowed_tokens(monkeypatch, u):
    # Inverse-CDF sampling: a uniform of 0 takes the first token with probability, the top end
    # the last; neither may land on a token the filters removed (probability 0). Uniforms are
    # below 1, but u * total can round up to the total: 1.0 stands for that.
    logits = torch.tensor([[0.0, 4.0, 3.0, -1.0, 3.5, 2.0]] * 3)
    params = [
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=1.0),
    ]
    sampler = Sampler()
    monkeypatch.setattr(sampler, "_uniforms", lambda ps, idx: torch.full((len(ps),), u, dtype=torch.float64))
    got = sampler.sample(logits, ["a", "b", "c"], params).token_ids
    # Top-k keeps {1, 4, 2} (its CDF in vocabulary order), top-p 0.5 keeps {1, 4} (0.47 before
    # 4; most likely first), no filter keeps all (vocabulary order).
    assert got == ([1, 1, 0] if u == 0.0 else [4, 4, 5])


@pytest.mark.parametrize("vocab", [49152, 128256])
def test_a_whole_vocabulary_is_searched_by_blocks_for_the_column_a_full_cumulative_sum_gives(
    monkeypatch, vocab
):
    # Block sums, then a cumulative sum inside one block (no float64 copy of the whole row): the
    # same column as the float64 cumulative sum of the row, for draws anywhere in [0, 1), rows
    # with whole blocks of zeros (top-k, top-p filtered) and the two ends of the interval.
    from tandem_worker.engine import sampler as sampler_mod

    g = torch.Generator().manual_seed(11)
    logits = torch.randn(6, vocab, generator=g) * 3
    logits[1, 1000:] = -math.inf  # mass only at the start
    logits[2, : vocab - 300] = -math.inf  # only at the end
    logits[3, torch.randperm(vocab, generator=g)[: vocab - 7]] = -math.inf  # 7 tokens, anywhere
    probs = torch.softmax(logits, dim=-1)
    u = torch.rand(6, 150, generator=g, dtype=torch.float64)
    u[:, 0], u[:, 1] = 0.0, 1.0 - 2**-53
    by_blocks = torch.stack([sampler_mod._inverse_cdf(probs, u[:, i]) for i in range(150)], 1)
    monkeypatch.setattr(sampler_mod, "_TWO_LEVEL_MIN", 1 << 40)  # the whole-row cumulative sum
    whole = torch.stack([sampler_mod._inverse_cdf(probs, u[:, i]) for i in range(150)], 1)
    assert torch.equal(by_blocks, whole)
    assert (probs.gather(1, by_blocks) > 0).all()  # never a token the filters removed
    assert by_blocks[3].unique().numel() > 3  # the draws spread over the seven tokens


# --- seeds -------------------------------------------------------------------------------------


def _step_logits(step: int, rows: int, vocab: int = 40) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1000 + step))


def test_same_seed_same_tokens_alone_or_batched():
    steps = 30
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    target = [_step_logits(t, 1)[0] for t in range(steps)]

    alone = Sampler(seed=0)
    alone_tokens = [alone.sample(target[t][None], ["x"], [params], [t]).token_ids[0] for t in range(steps)]

    batched = Sampler(seed=99)  # a different engine-wide stream must not matter either
    others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, seed=7), GREEDY]
    batched_tokens = []
    for t in range(steps):
        noise = _step_logits(t + 500, 3)
        pos = t % 4  # the request moves around in the batch
        rows = [noise[0], noise[1], noise[2]]
        rows.insert(pos, target[t])
        ids = ["u", "s", "g"]
        ids.insert(pos, "x")
        ps = list(others)
        ps.insert(pos, params)
        index = [t + 3, 2 * t, 0]
        index.insert(pos, t)
        res = batched.sample(torch.stack(rows), ids, ps, index)
        batched_tokens.append(res.token_ids[pos])
    assert batched_tokens == alone_tokens
    assert len(set(alone_tokens)) > 5, "the stream should not be degenerate"


def test_different_seeds_give_different_tokens():
    logits = torch.zeros(50)
    runs = []
    for seed in (1, 2):
        s = Sampler()
        p = SamplingParams(temperature=1.0, seed=seed)
        runs.append([s.sample(logits[None], ["x"], [p], [i]).token_ids[0] for i in range(40)])
    assert len(set(runs[0])) > 10, "each output position draws afresh"
    assert sum(a == b for a, b in zip(*runs)) < 10


def test_seeded_token_depends_only_on_seed_and_output_position():
    """So a prefill worker may sample token 0 and a decode worker the rest, equal to a colocated run."""
    logits = torch.zeros(1, 1000)
    p = SamplingParams(temperature=1.0, seed=5)
    first = [Sampler().sample(logits, ["x"], [p], [i]).token_ids[0] for i in range(6)]
    assert len(set(first)) > 1, "each output position draws a different value"
    other_sampler = Sampler(seed=99)
    other_sampler.sample(logits, ["noise"], [SamplingParams(temperature=1.0)])  # engine stream advances
    again = [other_sampler.sample(logits, ["y"], [p], [i]).token_ids[0] for i in range(6)]
    assert again == first
    reseeded = [
        Sampler().sample(logits, ["x"], [SamplingParams(temperature=1.0, seed=6)], [i]).token_ids[0]
        for i in range(6)
    ]
    assert reseeded != first


def test_unseeded_requests_follow_the_engine_seed():
    logits = torch.zeros(1, 1000)
    p = SamplingParams(temperature=1.0)

    def run(seed: int) -> list[int]:
        s = Sampler(seed=seed)
        return [s.sample(logits, [f"r{i}"], [p]).token_ids[0] for i in range(10)]

    assert run(3) == run(3)
    assert run(3) != run(4)


# --- logprobs ----------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_of_raw_logits_at_the_chosen_token():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 30, generator=g) * 3
    params = [
        SamplingParams(temperature=0.0, logprobs=True),
        SamplingParams(temperature=0.5, logprobs=True, seed=1),
        SamplingParams(temperature=2.0, top_k=3, logprobs=True, seed=2),
        SamplingParams(temperature=1.0, top_p=0.3, logprobs=True, seed=3),
        SamplingParams(temperature=1.0, seed=4),  # did not ask, but shares the batch
    ]
    res = Sampler().sample(logits, [f"r{i}" for i in range(5)], params)
    assert res.logprobs is not None and len(res.logprobs) == 5
    ref = torch.log_softmax(logits.double(), dim=-1)
    for i, tok in enumerate(res.token_ids):
        # Under the raw logits: not the tempered or truncated distribution actually sampled from.
        assert res.logprobs[i] == pytest.approx(float(ref[i, tok]), abs=1e-5)
    # Row 2's value under the tempered distribution differs, so the check above can tell them apart.
    tempered = torch.log_softmax(logits[2] / 2.0, dim=-1)[res.token_ids[2]]
    assert abs(res.logprobs[2] - float(tempered)) > 1e-3


def test_no_logprobs_unless_asked():
    res = Sampler().sample(torch.randn(2, 10), ["a", "b"], [GREEDY, SamplingParams(seed=1)])
    assert res.logprobs is None and res.top_logprobs is None


def test_top_logprobs_are_each_rows_most_likely_tokens_under_the_raw_logits():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 50, generator=g) * 4
    params = [
        SamplingParams(temperature=0.0, top_logprobs=3),
        SamplingParams(temperature=0.7, top_k=2, seed=1, top_logprobs=5),  # tempered, truncated draw
        SamplingParams(temperature=1.0, seed=2, logprobs=True),  # the sampled token's only
        SamplingParams(temperature=0.0),  # asked for nothing
    ]
    res = Sampler().sample(logits, ["a", "b", "c", "d"], params)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert res.top_logprobs is not None and [len(t) for t in res.top_logprobs] == [3, 5, 0, 0]
    for row, top in enumerate(res.top_logprobs[:2]):
        want = ref[row].topk(len(top))
        assert [t for t, _ in top] == want.indices.tolist()
        assert [lp for _, lp in top] == pytest.approx(want.values.tolist(), abs=1e-5)
        # The sampled token's logprob is its entry's when it is among them (greedy: the first).
        chosen = dict(top).get(res.token_ids[row])
        assert chosen is None or chosen == pytest.approx(res.logprobs[row], abs=1e-6)
    assert res.top_logprobs[0][0][0] == res.token_ids[0]
    # top_logprobs implies the sampled token's logprob; rows that asked for nothing get none listed.
    assert params[0].logprobs and res.logprobs is not None


@pytest.mark.parametrize("bad", [-1, 21, 2.5])
def test_top_logprobs_out_of_range_is_refused(bad):
    with pytest.raises(RequestError) as err:
        SamplingParams(top_logprobs=bad)
    assert err.value.field == "top_logprobs"


# --- temperature -------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_temperature_shapes_the_distribution(temperature):
    logits = torch.tensor([0.0, 1.0, 2.0])
    n = 1500
    tokens = draw(Sampler(seed=11), logits, SamplingParams(temperature=temperature), n)
    counts = counts_of(tokens, 3)
    expected = torch.softmax(logits / temperature, dim=-1).tolist()
    assert chi_square(counts, expected) < 13.8  # p = 0.001, 2 dof
    # The same draws are clearly inconsistent with the other temperatures' distributions.
    for other in (0.5, 1.0, 3.0):
        if other != temperature:
            wrong = torch.softmax(logits / other, dim=-1).tolist()
            assert chi_square(counts, wrong) > 50


def test_low_temperature_concentrates_on_the_argmax():
    logits = torch.tensor([1.0, 1.5, 1.2, 0.3])
    tokens = draw(Sampler(seed=0), logits, SamplingParams(temperature=0.05), 300)
    assert counts_of(tokens, 4)[1] >= 295


def test_tiny_temperature_does_not_crash_the_batch():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.1, 0.2]])
    params = [SamplingParams(temperature=1e-40), SamplingParams(temperature=1.0, seed=1)]
    res = Sampler().sample(logits, ["tiny", "other"], params)
    assert res.token_ids[0] == 2  # effectively greedy


# --- SamplingParams validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"seed": "7"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"stop": [3]}, "stop"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": 1.0001}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"temperature": -0.01}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_invalid_params_raise_request_error_naming_the_field(kwargs, field):
    with pytest.raises(RequestError) as exc:
        SamplingParams(**kwargs)
    assert exc.value.field == field
    assert str(exc.value).startswith(f"{field}:")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 1},
        {"top_p": 1.0},
        {"top_p": 1e-6},
        {"temperature": 0.0},
        {"top_k": 0},
        {"top_k": -1},
        {"top_k": 1},
        {"stop": "END"},
    ],
)
def test_valid_edge_params_are_accepted(kwargs):
    p = SamplingParams(**kwargs)
    if "stop" in kwargs:
        assert p.stop == ["END"]


def test_greedy_property():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0.9, top_k=1).greedy
    assert not SamplingParams(temperature=0.9).greedy
    assert not SamplingParams(temperature=0.9, top_k=-1).greedy


def test_nan_temperature_is_rejected():
    with pytest.raises(RequestError) as exc:
        SamplingParams(temperature=math.nan)
    assert exc.value.field == "temperature"


# --- the engine's stream for requests without a seed ---------------------------------------------


def test_engines_draw_unseeded_requests_differently_unless_given_one_sampling_seed(engine, model_dir):
    """Every worker seeded its stream for unseeded requests with 0: replicas, and a worker after a
    restart, drew the same tokens for the same prompts. Now each engine draws its own stream;
    `sampling_seed` replays one."""
    from tandem_worker.engine.llm_engine import LLMEngine
    from tests.engine.conftest import run_all

    def sample(e: LLMEngine) -> list[int]:
        rid = e.add_request(prompt="Once upon a time", params=SamplingParams(temperature=1.5, max_tokens=24))
        return list(run_all(e)[rid].token_ids)

    fresh = LLMEngine(model=str(model_dir), kv_cache_bytes=64 << 20)
    assert sample(fresh) != sample(engine)
    del fresh
    replay = [LLMEngine(model=str(model_dir), kv_cache_bytes=64 << 20, sampling_seed=7) for _ in range(2)]
    assert sample(replay[0]) == sample(replay[1])


def test_the_offline_llms_seed_also_seeds_unseeded_requests(monkeypatch):
    """`LLM(seed=N)` replays its unseeded draws, as vLLM's does; without one, its stream is random."""
    from tandem_worker import llm as llm_mod

    seen = []
    engine = SimpleNamespace(tokenizer=None)
    monkeypatch.setattr(llm_mod, "LLMEngine", lambda config: seen.append(config) or engine)
    llm_mod.LLM(seed=7)
    llm_mod.LLM(seed=7, sampling_seed=9)
    llm_mod.LLM()
    assert [(c.seed, c.sampling_seed) for c in seen] == [(7, 7), (7, 9), (0, None)]


# --- min_p and logit_bias -----------------------------------------------------------------------


def inverse_cdf_reference(probs: torch.Tensor, u: float) -> int:
    """The token a uniform `u` selects from `probs` by a float64 cumulative sum in vocabulary order."""
    cdf = probs.double().cumsum(0)
    return int(
        torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True)[0]
    )


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_draws_what_transformers_min_p_warper_leaves(monkeypatch, min_p):
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper

    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(3)) * 3
    params = SamplingParams(temperature=0.7, min_p=min_p)
    warped = MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(0.7)(None, logits.clone()))
    probs = torch.softmax(warped[0], -1)
    kept = set(torch.nonzero(probs).flatten().tolist())
    assert 1 <= len(kept) < 500
    sampler = Sampler()
    us = [i / 200 for i in range(200)]
    monkeypatch.setattr(sampler, "_uniforms", lambda ps, idx: torch.tensor(us, dtype=torch.float64))
    got = sampler.sample(logits.expand(len(us), -1).contiguous(), [f"r{i}" for i in us], [params] * len(us))
    assert got.token_ids == [inverse_cdf_reference(probs, u) for u in us]
    assert set(got.token_ids) <= kept and len(set(got.token_ids)) > (1 if len(kept) > 2 else 0)


def test_min_p_combines_with_top_k_and_a_mixed_batch():
    logits = torch.tensor([3.0, 2.9, 1.0, 0.5, 2.95, -1.0])
    # min_p 0.5 of the most likely keeps tokens within log(2) of the max: 0, 1, 4.
    plain = draw(Sampler(seed=0), logits, SamplingParams(temperature=1.0, min_p=0.5), 300)
    assert set(plain) == {0, 1, 4}
    with_k = draw(Sampler(seed=0), logits, SamplingParams(temperature=1.0, min_p=0.5, top_k=2), 300)
    assert set(with_k) == {0, 4}
    rows = torch.stack([logits, logits])
    batch = [SamplingParams(temperature=1.0, min_p=0.5), SamplingParams(temperature=1.0)]
    seen: list[set[int]] = [set(), set()]
    sampler = Sampler(seed=0)
    for i in range(300):
        out = sampler.sample(rows, [f"a{i}", f"b{i}"], batch).token_ids
        seen[0].add(out[0])
        seen[1].add(out[1])
    assert seen[0] == {0, 1, 4} and {2, 3} <= seen[1]


def test_logit_bias_is_added_before_anything_else_and_logprobs_stay_raw():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3)
    params = [
        SamplingParams(temperature=0.0, logit_bias={3: 10.0}, logprobs=True),  # greedy obeys it
        SamplingParams(temperature=1.0, logit_bias={0: -100.0, 1: -100.0, 3: -100.0}),  # only 2 left
        SamplingParams(temperature=0.0),
    ]
    out = Sampler(seed=0).sample(logits, ["a", "b", "c"], params)
    assert out.token_ids == [3, 2, 0]
    assert out.logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[3]))
    # Before the penalties, as vLLM orders them: a biased token's positive logit is then divided.
    # Token 1: (1 + 0.75) / 2 = 0.875 < token 0's 2 / 2; the other order would give 1 / 2 + 0.75.
    both = SamplingParams(temperature=0.0, logit_bias={1: 0.75}, repetition_penalty=2.0)
    raw = logits.clone()
    got = Sampler().sample(logits[:1], ["d"], [both], history=[([1, 0], [])]).token_ids
    assert got == [0]
    assert torch.equal(logits, raw), "the raw logits (log-probabilities' source) were changed"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": float("nan")}, "min_p"),
        ({"logit_bias": {5: 101.0}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias"),
        ({"logit_bias": [5]}, "logit_bias"),
    ],
)
def test_bad_min_p_and_logit_bias_are_refused_by_name(kwargs, field):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**kwargs)


def test_banned_tokens_are_never_drawn_on_any_path():
    # min_tokens' ban (EOS and stop token ids) beats even a +100 bias, on greedy, top-k and full rows.
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]] * 3)
    params = [
        SamplingParams(temperature=0.0, logit_bias={1: 100.0}),
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=5.0),
    ]
    sampler, seen = Sampler(seed=0), set()
    for i in range(200):
        out = sampler.sample(logits, [f"a{i}", f"b{i}", f"c{i}"], params, banned=[frozenset({0, 1})] * 3)
        seen.update(out.token_ids)
        assert out.token_ids[0] == 2 and out.token_ids[1] in (2, 3)
    assert seen == {2, 3, 4}


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(RequestError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(RequestError, match="min_tokens"):
        SamplingParams(min_tokens=-1)
