"""`Sampler`: next tokens from logits, per request: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # log-probability of each chosen token under the raw logits


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

    def forget(self, request_id: str) -> None:
        """Nothing is kept per request (kept for callers that release request state)."""

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
    ) -> SampleResult:
        """`logits`: [num_seqs, vocab] float32, one row per request; `output_index`: each row's
        position among its request's generated tokens (0 for the first)."""
        output_index = output_index or [0] * len(params)
        if all(p.greedy for p in params):
            # The common serving case: argmax where the logits are and bring back n ints, not
            # n x vocab floats (131 MB per step for batch 256 of a 128K vocabulary); on a CPU it
            # also skips copying the rows out first.
            chosen = logits.argmax(dim=-1)
        else:
            # Seeded and random draws use CPU generators, so a request's tokens are the same on
            # every device and process (a prefill worker samples the first token, a decode worker
            # the rest).
            logits = logits.float().cpu()
            chosen = self._sample_on_host(logits, params, output_index)
        logprobs = None
        if any(p.logprobs for p in params):
            lp = torch.log_softmax(logits.float(), dim=-1).gather(1, chosen[:, None])[:, 0]
            logprobs = lp.tolist()
        return SampleResult(chosen.tolist(), logprobs)

    def _sample_on_host(
        self, logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]
    ) -> torch.Tensor:
        n = logits.shape[0]
        chosen = torch.empty(n, dtype=torch.long)
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        if greedy_rows:
            idx = torch.tensor(greedy_rows)
            chosen[idx] = logits[idx].argmax(dim=-1)
        for i, p in enumerate(params):
            if p.greedy:
                continue
            row = logits[i] / p.temperature
            if p.top_k > 0 and p.top_k < row.shape[0]:
                kth = torch.topk(row, p.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_vals, sorted_idx = torch.sort(row, descending=True)
                probs = torch.softmax(sorted_vals, dim=-1)
                # Keep the smallest prefix whose mass reaches top_p (always at least one token).
                drop = probs.cumsum(-1) - probs >= p.top_p
                sorted_vals = sorted_vals.masked_fill(drop, float("-inf"))
                row = torch.full_like(row, float("-inf")).scatter(0, sorted_idx, sorted_vals)
            probs = torch.softmax(row, dim=-1)
            chosen[i] = torch.multinomial(probs, 1, generator=self._generator_for(p, output_index[i]))[0]
        return chosen
