"""`Penalties`: presence, frequency and repetition penalties on the logits, per request.

As OpenAI's API and vLLM define them, in vLLM's order: repetition_penalty (transformers' and
vLLM's) divides the positive logit of every token in the prompt or the output and multiplies a
negative one; then each generated token's logit is lowered by frequency_penalty per time it was
generated and by presence_penalty once.

What each penalized request has seen is kept where the logits are, in one row of two matrices
(tokens seen, prompt and output; and counts of generated tokens), updated with each step's new
tokens. Building them from the token lists at every step cost 28 ms on the host for 64 prompts of
4K tokens; a step now takes its rows' new tokens and one gather.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampling_params import SamplingParams


class Penalties:
    def __init__(self) -> None:
        self._seen: torch.Tensor | None = None  # [slots, vocab] bool: in the prompt or the output
        self._counts: torch.Tensor | None = None  # [slots, vocab] float32: times generated
        self._slot: dict[str, int] = {}  # request id -> its row
        self._counted: dict[str, int] = {}  # request id -> output tokens already in its row
        self._free: list[int] = []

    def forget(self, request_id: str) -> None:
        """The request has ended: its row is free for another."""
        slot = self._slot.pop(request_id, None)
        if slot is None:
            return
        del self._counted[request_id]
        self._free.append(slot)
        if not self._slot:  # the memory of a burst of penalized requests goes back once it ends
            self._seen = self._counts = None
            self._free.clear()

    def apply(
        self,
        logits: torch.Tensor,
        request_ids: Sequence[str],
        params: Sequence[SamplingParams],
        history: Sequence[tuple[Sequence[int], Sequence[int]]],
    ) -> torch.Tensor:
        """The batch's logits (float32) with each penalized row's penalties applied; `history`:
        each row's prompt and generated token ids (read for penalized rows only)."""
        rows = [i for i, p in enumerate(params) if p.penalized]
        if not rows:
            return logits
        seen, counts = self._rows(logits, [request_ids[i] for i in rows], [history[i] for i in rows])
        device = logits.device
        chosen = [params[i] for i in rows]
        values = [(p.repetition_penalty, p.frequency_penalty, p.presence_penalty) for p in chosen]
        rep, freq, pres = torch.tensor(values, dtype=torch.float32, device=device).T[:, :, None]
        all_rows = len(rows) == len(params)
        at = None if all_rows else torch.tensor(rows, device=device)
        # New tensors throughout: the caller's logits stay raw (log-probabilities come from them).
        x = (logits if at is None else logits[at]).float()
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - counts * freq - (counts > 0).float() * pres
        if at is None:
            return x
        scores = logits.float().clone()
        scores[at] = x
        return scores

    def _rows(
        self, logits: torch.Tensor, request_ids: list[str], history: list[tuple[Sequence[int], Sequence[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of `request_ids`, brought up to date with their new tokens: ([n, vocab] seen,
        [n, vocab] counts)."""
        vocab, device = logits.shape[-1], logits.device
        if self._seen is None or self._seen.shape[1] != vocab or self._seen.device != device:
            self._seen = torch.zeros(0, vocab, dtype=torch.bool, device=device)
            self._counts = torch.zeros(0, vocab, dtype=torch.float32, device=device)
            self._slot.clear()
            self._counted.clear()
            self._free.clear()
        assert self._counts is not None
        seen_at: tuple[list[int], list[int]] = ([], [])  # (slots, token ids) newly seen
        count_at: tuple[list[int], list[int]] = ([], [])  # (slots, token ids) newly generated
        slots = []
        for rid, (prompt, output) in zip(request_ids, history):
            slot = self._slot.get(rid)
            if slot is None:
                slot = self._allocate(rid)
                seen_at[0].extend([slot] * len(prompt))
                seen_at[1].extend(prompt)
            new = output[self._counted[rid] :]
            seen_at[0].extend([slot] * len(new))
            seen_at[1].extend(new)
            count_at[0].extend([slot] * len(new))
            count_at[1].extend(new)
            self._counted[rid] = len(output)
            slots.append(slot)
        if seen_at[0]:
            at = (torch.tensor(seen_at[0], device=device), torch.tensor(seen_at[1], device=device))
            self._seen[at] = True
        if count_at[0]:
            at = (torch.tensor(count_at[0], device=device), torch.tensor(count_at[1], device=device))
            self._counts.index_put_(at, torch.ones(len(count_at[0]), device=device), accumulate=True)
        index = torch.tensor(slots, device=device)
        return self._seen[index], self._counts[index]

    def _allocate(self, request_id: str) -> int:
        assert self._seen is not None and self._counts is not None
        if not self._free:
            # Doubling: a batch's worth of new penalized requests costs one copy, not one each.
            old = self._seen.shape[0]
            grow = max(old, 8)
            self._seen = torch.cat([self._seen, self._seen.new_zeros(grow, self._seen.shape[1])])
            self._counts = torch.cat([self._counts, self._counts.new_zeros(grow, self._counts.shape[1])])
            self._free.extend(range(old + grow - 1, old - 1, -1))
        slot = self._free.pop()
        self._seen[slot] = False
        self._counts[slot] = 0.0
        self._slot[request_id] = slot
        self._counted[request_id] = 0
        return slot
