"""`Penalties`: presence, frequency and repetition penalties on the logits, per request.

As OpenAI's API and vLLM define them, in vLLM's order: repetition_penalty (transformers' and
vLLM's) divides the positive logit of every token in the prompt or the output and multiplies a
negative one; then each generated token's logit is lowered by frequency_penalty per time it was
generated and by presence_penalty once.

Only the logits of tokens a request has seen are touched, sparsely: each penalized request keeps,
on the host, the distinct tokens of its prompt and output and the counts of its generated ones,
updated with each step's new tokens. A step then gathers, changes and scatters those few logits
(41K for 64 rows of 640 tokens seen), where dense [rows, vocabulary] masks took 14 ms a step on
2 cores for 64 rows of a 49K vocabulary, and 5 bytes per token of the vocabulary per request on the
device, which the KV cache sizing does not leave.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .sampling_params import SamplingParams


class _Growing:
    """A numpy array appended to in place (capacity doubling): a step's view costs nothing."""

    def __init__(self, dtype: type, initial: np.ndarray | None = None) -> None:
        self.data = np.zeros(16, dtype) if initial is None or not len(initial) else initial.astype(dtype)
        self.size = 0 if initial is None else len(initial)

    def append(self, value: float) -> None:
        if self.size == len(self.data):
            self.data = np.concatenate([self.data, np.zeros(len(self.data), self.data.dtype)])
        self.data[self.size] = value
        self.size += 1

    @property
    def view(self) -> np.ndarray:
        return self.data[: self.size]


class _Seen:
    """One request's tokens seen: distinct tokens of prompt and output, and generated counts."""

    def __init__(self, prompt: Sequence[int]) -> None:
        distinct = np.unique(np.asarray(prompt, dtype=np.int64))
        self.tokens = _Growing(np.int64, distinct)
        self.members = set(distinct.tolist())
        self.generated = _Growing(np.int64)
        self.counts = _Growing(np.float32)
        self.position: dict[int, int] = {}  # generated token -> its index in `generated`
        self.counted = 0  # generated tokens taken in

    def take(self, output: Sequence[int]) -> None:
        for token in output[self.counted :]:
            if token not in self.members:
                self.members.add(token)
                self.tokens.append(token)
            at = self.position.get(token)
            if at is None:
                self.position[token] = self.generated.size
                self.generated.append(token)
                self.counts.append(1.0)
            else:
                self.counts.data[at] += 1.0
        self.counted = len(output)


class Penalties:
    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}

    def forget(self, request_id: str) -> None:
        """The request has ended: what it had seen is dropped."""
        self._seen.pop(request_id, None)

    def apply(
        self,
        logits: torch.Tensor,
        request_ids: Sequence[str],
        params: Sequence[SamplingParams],
        history: Sequence[tuple[Sequence[int], Sequence[int]]],
        owned: bool = False,
    ) -> torch.Tensor:
        """The batch's logits (float32) with each penalized row's penalties applied; `history`:
        each row's prompt and generated token ids (read for penalized rows only). A new tensor,
        so the caller's logits stay raw (log-probabilities come from them), unless `owned`: float32
        logits the caller made for this (a bias added), changed in place."""
        rows = [i for i, p in enumerate(params) if p.penalized]
        if not rows:
            return logits
        seen = []
        for i in rows:
            s = self._seen.get(request_ids[i])
            if s is None:
                s = self._seen[request_ids[i]] = _Seen(history[i][0])
            s.take(history[i][1])
            seen.append(s)
        scores = logits if owned and logits.dtype == torch.float32 else float_copy(logits)
        device = logits.device
        row_of = np.asarray(rows, dtype=np.int64)
        rep = [
            (j, params[i].repetition_penalty)
            for j, i in enumerate(rows)
            if params[i].repetition_penalty != 1.0
        ]
        if rep:
            picked = [j for j, _ in rep]
            r, t = _flat([seen[j].tokens.view for j in picked], row_of[picked], device)
            factor = _per_entry([p for _, p in rep], [seen[j].tokens.size for j in picked], device)
            v = scores[r, t]
            scores[r, t] = torch.where(v > 0, v / factor, v * factor)
        other = [j for j, i in enumerate(rows) if params[i].frequency_penalty or params[i].presence_penalty]
        if other:
            r, t = _flat([seen[j].generated.view for j in other], row_of[other], device)
            sizes = [seen[j].generated.size for j in other]
            counts = torch.from_numpy(np.concatenate([seen[j].counts.view for j in other])).to(device)
            freq = _per_entry([params[rows[j]].frequency_penalty for j in other], sizes, device)
            pres = _per_entry([params[rows[j]].presence_penalty for j in other], sizes, device)
            scores[r, t] -= counts * freq + pres
        return scores


def float_copy(logits: torch.Tensor) -> torch.Tensor:
    """A float32 copy (one copy: `float()` of other dtypes already is one)."""
    return logits.clone() if logits.dtype == torch.float32 else logits.float()


def _flat(
    tokens: list[np.ndarray], rows: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs of every row's tokens, for one gather or scatter."""
    sizes = [len(t) for t in tokens]
    r = torch.from_numpy(np.repeat(rows, sizes)).to(device)
    return r, torch.from_numpy(np.concatenate(tokens)).to(device)


def _per_entry(values: list[float], sizes: list[int], device: torch.device) -> torch.Tensor:
    """Each row's value repeated for each of its entries."""
    return torch.from_numpy(np.repeat(np.asarray(values, dtype=np.float32), sizes)).to(device)
