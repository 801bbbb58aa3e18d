"""`Sampler`: next tokens from logits, per request: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .penalties import Penalties, float_copy
from .sampling_params import SamplingParams

# A position's most likely tokens, most likely first: (token id, log-probability) pairs.
TopLogprobs = list[tuple[int, float]]


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # log-probability of each chosen token under the raw logits
    # Per row, its request's top_logprobs most likely tokens (empty for rows that asked for none);
    # None when no row asked.
    top_logprobs: list[TopLogprobs] | None = None


def _token_seed(seed: int, index: int) -> int:
    """A seed for output token `index` of a seeded request (splitmix64 of the pair)."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        # Requests without a seed draw from one engine-wide stream.
        self._generator = torch.Generator().manual_seed(seed)
        self._token_generator = torch.Generator()
        self.penalties = Penalties()

    def forget(self, request_id: str) -> None:
        """The request has ended: what was kept for its penalties is released."""
        self.penalties.forget(request_id)

    def _generator_for(self, params: SamplingParams, index: int) -> torch.Generator:
        if params.seed is None:
            return self._generator
        # Each output position draws from its own seed, so a seeded request's tokens depend on
        # neither its batch nor the process: a prefill worker can sample the first token and a
        # decode worker the rest, and the result equals a colocated run.
        return self._token_generator.manual_seed(_token_seed(params.seed, index))

    def sample(
        self,
        logits: torch.Tensor,
        request_ids: list[str],
        params: list[SamplingParams],
        output_index: list[int] | None = None,
        history: list[tuple[list[int], list[int]]] | None = None,
        banned: list[frozenset[int]] | None = None,
        allowed: tuple[list[int], np.ndarray] | None = None,
    ) -> SampleResult:
        """`logits`: [num_seqs, vocab] float32, one row per request; `output_index`: each row's
        position among its request's generated tokens (0 for the first); `history`: each row's
        prompt and generated token ids, which rows with penalties need; `banned`: tokens each row
        must not draw (a request short of its min_tokens: its EOS and stop token ids); `allowed`:
        rows whose next token a grammar restricts, and their masks (int32 [len(rows), vocab / 32],
        a bit per token, as `Grammars.masks` makes them)."""
        output_index = output_index or [0] * len(params)
        scores = logits
        owned = False
        if allowed is not None and allowed[0]:  # a hard constraint, before everything else
            scores, owned = _mask_disallowed(logits, *allowed), True
        if any(p.logit_bias for p in params) or bool(banned and any(banned)):  # then, as vLLM orders them
            scores, owned = _add_logit_bias(scores, params, banned, owned), True
        if any(p.penalized for p in params):
            if history is None:
                raise ValueError("rows with penalties need their prompt and generated tokens (history)")
            scores = self.penalties.apply(scores, request_ids, params, history, owned=owned)
        # Either way the work stays where the logits are and n ints come back, not n x vocab
        # floats (131 MB per step for batch 256 of a 128K vocabulary).
        if all(p.greedy for p in params):
            chosen = scores.argmax(dim=-1)
        else:
            chosen = self._draw(scores, params, output_index)
        logprobs = top = None
        if any(p.logprobs for p in params):
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            logprobs = log_probs.gather(1, chosen[:, None])[:, 0].tolist()
            k = max(p.top_logprobs for p in params)
            if k:
                # One topk for the batch at its largest k; each row keeps its first top_logprobs.
                values, ids = log_probs.topk(k, dim=-1)
                values, ids = values.tolist(), ids.tolist()
                top = [
                    list(zip(ids[row][: p.top_logprobs], values[row][: p.top_logprobs]))
                    for row, p in enumerate(params)
                ]
        return SampleResult(chosen.tolist(), logprobs, top)

    def _uniforms(self, params: list[SamplingParams], output_index: list[int]) -> torch.Tensor:
        """One uniform draw in [0, 1) per row, float64 on the host: a seeded request's from its
        own (seed, output position) stream, the others' from the engine-wide one."""
        u = torch.empty(len(params), dtype=torch.float64)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), generator=self._generator, dtype=torch.float64)
        for i, p in enumerate(params):
            if p.seed is not None:
                u[i] = torch.rand((), generator=self._generator_for(p, output_index[i]), dtype=torch.float64)
        return u

    def _draw(
        self, logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]
    ) -> torch.Tensor:
        """Tokens for a batch with sampled rows (greedy rows take their argmax), computed where the
        logits are and batched over rows: temperature, top-k, top-p, then inverse-CDF sampling at
        one uniform per row. Only the uniforms come from the host (its generators: a request's
        tokens follow its seed on any worker), and only the token ids go back."""
        drawn = [i for i, p in enumerate(params) if not p.greedy]
        if len(drawn) == len(params):
            return self._draw_rows(logits, params, output_index)
        chosen = logits.argmax(dim=-1)
        rows = torch.tensor(drawn, device=logits.device)
        chosen[rows] = self._draw_rows(
            logits[rows], [params[i] for i in drawn], [output_index[i] for i in drawn]
        )
        return chosen

    def _draw_rows(
        self, logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]
    ) -> torch.Tensor:
        vocab, device = logits.shape[-1], logits.device
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        # A NaN or +inf logit (an overflowing model) made softmax all NaN and the draw land past the
        # vocabulary, which then failed the whole batch's next step: NaN counts as impossible and
        # +inf as the largest finite value, so the draw stays a real token.
        x = torch.nan_to_num(
            logits.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max, neginf=float("-inf")
        )
        x = x / temperature[:, None]
        min_p = [p.min_p for p in params]
        if any(min_p):
            # Less likely than min_p times the most likely token: p_i < min_p * p_max, that is
            # x_i < x_max + log(min_p), so no softmax is needed (log 0 = -inf drops nothing).
            floor = x.amax(-1, keepdim=True) + torch.tensor(min_p, device=device).log()[:, None]
            x = x.masked_fill(x < floor, float("-inf"))
        ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        if all(ks) and max(ks) <= NUCLEUS_CANDIDATES:
            tokens = self._draw_top_k(x, ks, params, output_index)
            if tokens is not None:
                return tokens
        if any(ks):
            # The k-th largest value of each row (k = its own); rows without top-k keep all.
            kth = torch.topk(x, max(ks), dim=-1).values
            floor = kth.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=device)[:, None])
            # masked_fill, not a boolean index: that one reads the mask's count back (a device sync).
            floor = floor.masked_fill(torch.tensor([[k == 0] for k in ks], device=device), float("-inf"))
            x = x.masked_fill(x < floor, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        # A row with nothing possible (all -inf), or whose largest value overflowed to +inf: its
        # argmax, as greedy would take. Softmax makes such a row NaN throughout (x - max is NaN where
        # x equals the infinite max, and the sum carries it to every column): one column tells.
        dead = ~torch.isfinite(probs[:, 0])
        if dead.any():
            probs[dead] = torch.nn.functional.one_hot(x[dead].argmax(-1), vocab).to(probs.dtype)
        u = self._uniforms(params, output_index).to(device)
        return _mixed_draw(probs, params, u)

    def _draw_top_k(
        self, x: torch.Tensor, ks: list[int], params: list[SamplingParams], output_index: list[int]
    ) -> torch.Tensor | None:
        """Every row keeps its top k: the draw among each row's max(ks) most likely tokens only,
        not a softmax and a float64 cumulative sum over the whole vocabulary (128K for Llama-3)
        for the 50 tokens a row keeps. The same tokens, in vocabulary order, as the full path's
        draw at the same uniform. None (take the full path) when a row's k-th value ties past the
        candidates, which the full path keeps all of, or a row has nothing finite to draw from."""
        device = x.device
        kmax = max(ks)
        values, ids = x.topk(kmax, dim=-1)
        k_index = torch.tensor([k - 1 for k in ks], device=device)
        floor = values.gather(1, k_index[:, None])
        probs = torch.softmax(values.masked_fill(values < floor, float("-inf")), dim=-1)
        # A k-th value of -inf (min_p or a bias left fewer than k tokens): every possible token is
        # among the candidates.
        spill = ((x >= floor).sum(-1) > kmax) & (floor[:, 0] > float("-inf"))
        if bool((spill | ~torch.isfinite(probs).all(dim=-1)).any()):
            return None
        # In vocabulary order, as the full path's cumulative sum runs (ties then draw alike).
        ids, by_id = ids.sort(dim=-1)
        probs = probs.gather(1, by_id)
        u = self._uniforms(params, output_index).to(device)
        return ids.gather(1, _mixed_draw(probs, params, u)[:, None])[:, 0]


def _mask_disallowed(logits: torch.Tensor, rows: list[int], masks: np.ndarray) -> torch.Tensor:
    """The logits (float32, a new tensor) with -inf at the tokens each listed row's mask leaves out
    (bit j of word i clear: token 32 i + j)."""
    out = float_copy(logits)
    device, vocab = logits.device, logits.shape[-1]
    unpack = _dropped_on_host if device.type == "cpu" else _dropped_on_device
    drop = unpack(masks, vocab, device)
    if len(rows) == out.shape[0]:
        return out.masked_fill_(drop, float("-inf"))
    at = torch.tensor(rows, device=device)
    return out.index_copy_(0, at, out.index_select(0, at).masked_fill_(drop, float("-inf")))


def _dropped_on_host(masks: np.ndarray, vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] bool, True where the mask's bit is clear. numpy unpacks bits to bytes in one
    pass (64 rows of 49K: 0.14 ms; the shifts below take 2 ms on 2 cores)."""
    unpacked = np.unpackbits((~masks).view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    return torch.from_numpy(unpacked.view(np.bool_))


def _dropped_on_device(masks: np.ndarray, vocab: int, device: torch.device) -> torch.Tensor:
    """As _dropped_on_host, unpacked where the logits are: a few KB per row cross to the device, not
    a vocabulary of flags."""
    words = torch.from_numpy(masks).to(device)
    bits = (words[:, :, None] >> torch.arange(32, dtype=torch.int32, device=device)) & 1
    return bits.reshape(len(masks), -1)[:, :vocab] == 0


def _add_logit_bias(
    logits: torch.Tensor,
    params: list[SamplingParams],
    banned: list[frozenset[int]] | None,
    owned: bool = False,
) -> torch.Tensor:
    """The logits (float32, a new tensor unless `owned`, a float32 one the caller gave up:
    log-probabilities come from the raw ones) plus each row's logit_bias, and -inf at its banned
    tokens."""
    rows, tokens, biases = [], [], []
    for row, p in enumerate(params):
        ban = banned[row] if banned else frozenset()
        for token, bias in p.logit_bias.items():
            if token not in ban:
                rows.append(row)
                tokens.append(token)
                biases.append(bias)
        for token in ban:
            rows.append(row)
            tokens.append(token)
            biases.append(float("-inf"))
    out = logits if owned and logits.dtype == torch.float32 else float_copy(logits)
    device = logits.device
    at = (torch.tensor(rows, device=device), torch.tensor(tokens, device=device))
    out[at] += torch.tensor(biases, dtype=torch.float32, device=device)
    return out


# Candidates for a top-p nucleus: the most likely tokens of each row, by topk, instead of a sort
# of the whole vocabulary (a sort of 64 rows of 49,152 took 10x a topk of 1,024 on 2 cores). A
# batch with a row whose nucleus reaches past them falls back to the sort.
NUCLEUS_CANDIDATES = 1024


def _mixed_draw(probs: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Columns of `probs` drawn at `u`: from the top-p nucleus for rows with top_p < 1, from the
    whole row for the others."""
    nucleus = [j for j, p in enumerate(params) if p.top_p < 1.0]
    if not nucleus:
        return _inverse_cdf(probs, u)
    device = probs.device
    top_p = torch.tensor([params[j].top_p for j in nucleus], dtype=torch.float32, device=device)
    if len(nucleus) == len(params):
        return _nucleus_draw(probs, top_p, u)
    tokens = torch.empty(len(params), dtype=torch.long, device=device)
    at = torch.tensor(nucleus, device=device)
    tokens[at] = _nucleus_draw(probs[at], top_p, u[at])
    at = torch.tensor([j for j, p in enumerate(params) if p.top_p >= 1.0], device=device)
    tokens[at] = _inverse_cdf(probs[at], u[at])
    return tokens


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's smallest set of most likely tokens whose mass reaches its top_p (always at least
    one token): their probabilities, most likely first and ties by token id, zero past the set;
    and their token ids."""
    kept, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    before = kept.cumsum(-1) - kept  # mass of the more likely tokens
    if (before[:, -1] + kept[:, -1] < top_p).any():  # the candidates hold less than a nucleus
        # Stable: tied tokens stay in id order.
        kept, order = probs.sort(dim=-1, descending=True, stable=True)
    else:
        # topk orders tied tokens as it likes (and unlike the sort): put them in id order, so a
        # seeded request draws the same token whichever path its batch took (bf16 logits tie).
        order, by_id = order.sort(dim=-1)
        kept, by_p = kept.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
        order = order.gather(1, by_p)
    before = kept.cumsum(-1) - kept
    return kept.masked_fill(before >= top_p[:, None], 0.0), order


def _nucleus_draw(probs: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens drawn from each row's top-p nucleus, renormalized."""
    kept, order = _nucleus(probs, top_p)
    return order.gather(1, _inverse_cdf(kept, u)[:, None])[:, 0]


# A whole-vocabulary row is searched in two levels: float64 sums of blocks of this many columns
# (summed without a float64 copy of the row), then a cumulative sum inside the one block the draw
# falls in. A float64 copy and cumulative sum of the whole row were the sampler's largest cost
# (64 rows of Llama-3's 128K: 96 MB written, as much read back).
CDF_BLOCK_CHOICES = (1024, 512, 256, 128)
_TWO_LEVEL_MIN = 8192  # columns; shorter rows (candidates) take the one-level sum


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The column of each row where its cumulative probability first exceeds u * its total."""
    n = probs.shape[-1]
    block = next((b for b in CDF_BLOCK_CHOICES if n % b == 0), 0) if n >= _TWO_LEVEL_MIN else 0
    if block:
        return _inverse_cdf_blocks(probs, u, block)
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    # Strictly below the total (u * total can round up to it): the search then lands on a
    # column of nonzero probability, never past the last one.
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]


def _inverse_cdf_blocks(probs: torch.Tensor, u: torch.Tensor, block: int) -> torch.Tensor:
    """_inverse_cdf over blocks of `block` columns: the same column but where the draw lands within
    rounding (float64 sums in another order) of a boundary between two tokens."""
    rows = probs.shape[0]
    blocks = probs.reshape(rows, -1, block)
    cum = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [rows, blocks]
    total = cum[:, -1:]
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    # The first block whose cumulative mass passes the target: it holds some of it (a block of
    # zeros never does), so a column of nonzero probability follows.
    b = torch.searchsorted(cum, target, right=True).clamp_(max=cum.shape[1] - 1)  # [rows, 1]
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inside = blocks.gather(1, b[:, :, None].expand(rows, 1, block))[:, 0].double().cumsum(-1)
    # Rounding between the two sums must not push the target past this block's own total.
    last = inside[:, -1:]
    rest = torch.minimum(target - before, torch.nextafter(last, torch.zeros_like(last)))
    col = torch.searchsorted(inside, rest.clamp(min=0), right=True).clamp_(max=block - 1)
    return b[:, 0] * block + col[:, 0]
