"""`Sampler`: next tokens from logits, per request: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # log-probability of each chosen token under the raw logits


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        # Requests without a seed draw from one engine-wide stream.
        self._generator = torch.Generator().manual_seed(seed)
        self._seeded: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._seeded.pop(request_id, None)

    def _generator_for(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._generator
        g = self._seeded.get(request_id)
        if g is None:
            # A per-request stream makes the output independent of what it is batched with.
            g = self._seeded[request_id] = torch.Generator().manual_seed(params.seed)
        return g

    def sample(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
    ) -> SampleResult:
        """`logits`: [num_seqs, vocab] float32, one row per request in `request_ids`."""
        logits = logits.float().cpu()
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
            chosen[i] = torch.multinomial(probs, 1, generator=self._generator_for(request_ids[i], p))[0]
        logprobs = None
        if any(p.logprobs for p in params):
            lp = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0]
            logprobs = lp.tolist()
        return SampleResult(chosen.tolist(), logprobs)
