"""`LoRAFold`: a decode step's LoRA shrink folded into the base projections' GEMMs.

At decode batch sizes the LoRA kernels are bound by latency, not bandwidth: a shrink launch and an
expand launch per projection cost about 36% of the base GEMMs' time on an H200 (Llama-3-8B shapes,
rank 16, batch 64; benchmarks/bench_gpu.py, section lora). With the A rows of the step's adapters
appended to each projection's weight, one cuBLAS GEMM computes the projection and every adapter's
x @ A.T together (the extra rows cost their bytes: about 0.3% of a layer's for a rank-16 adapter),
and a single expand launch (`tandem_kernels.lora_apply_finish`) adds the deltas from those extra
output columns: 14-18.5% of the base GEMMs over three calls of the same measurement (sections lora
and lora_folded_sweep); in decode steps of 8 layers at batch 64, LoRA's cost over no adapter went
from 69% to 43% (one adapter).

Each projection's weight becomes the first rows of a larger buffer, [hidden_out + rows, hidden_in],
rows = parts x `fold_rank` (qkv: 3 x fold_rank); the module's weight (and bias) is a view of its
first hidden_out rows, so every other path computes exactly what it did. The extra rows hold the A
matrices of the adapters placed there (`place`), copied from the adapter pool: an adapter's stacked
A rows of a projection (its total rank there) go to the same offset in every layer. A step whose
adapters are all placed replays the folded graphs; placing costs one copy per layer and projection
for each adapter newly placed, which happens when a new adapter first joins a batch, not per step.
A step whose adapters do not fit in the rows at once uses the unfolded LoRA graphs.

The expand reads each slot's columns of the GEMM's output through per-layer tables kept beside
the adapter tables: y offsets (each part's columns within the adapter's stacked rows, plus its
placement) and total ranks (placement plus stacked rank), as static device tensors updated in
place, so a captured graph reads the current placement.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .lora import KINDS, LoRATables

log = logging.getLogger(__name__)

# The module of each LoRA projection kind inside a decoder layer.
_MODULES = {
    "qkv": ("self_attn", "qkv_proj"),
    "o": ("self_attn", "o_proj"),
    "gate_up": ("mlp", "gate_up_proj"),
    "down": ("mlp", "down_proj"),
}


class LoRAFold:
    """The folded weights of every LoRA projection, which adapters' A rows they hold, and the
    expand's tables for that placement."""

    def __init__(self, weights: FoldedWeights, tables: LoRATables, pool: torch.Tensor) -> None:
        """`weights`: what `fold_layers` returned."""
        self.tables, self.pool, self.weights = tables, pool, weights
        weight, _, hidden_out = weights[0]["o"]  # one part: its extra rows are the fold rank
        self.fold_rank = weight.shape[0] - hidden_out
        self.rows = _rows(self.fold_rank)
        # The placement: slot -> its first row among the extra rows of each kind, and the adapter
        # tables' generation of that slot when its rows were copied (a new adapter in the slot, or
        # new files of the same one, changes it).
        self.resize()

    def resize(self) -> None:
        """Allocate the expand's tables for the adapter tables' capacity (new tensors: graphs that
        read the old ones must be captured again) and forget the placement."""
        self.base: dict[int, dict[str, int]] = {}
        self.copied: dict[int, int] = {}
        self.end = {kind: 0 for kind in KINDS}
        layers, slots, device = len(self.weights), self.tables.capacity, self.pool.device
        self.y_offsets = {
            kind: torch.zeros(layers, len(parts), slots, dtype=torch.int64, device=device)
            for kind, parts in KINDS.items()
        }
        self.total_ranks = {
            kind: torch.zeros(layers, slots, dtype=torch.int32, device=device) for kind in KINDS
        }
        self._tables_key: tuple | None = None

    def place(self, slots: set[int]) -> bool:
        """Make every adapter slot in `slots` readable from the extra rows (copying A rows where
        needed) and the expand's tables current; False if they do not fit at once."""
        tables = self.tables
        if tables.capacity != self.total_ranks["o"].shape[1]:
            return False  # the tables grew since `resize`: not for graphs of the old ones
        generation = tables.slot_generation
        for slot in list(self.base):
            if self.copied[slot] != generation[slot]:
                del self.base[slot], self.copied[slot]  # another adapter, or new files: copy again
        missing = [s for s in sorted(slots) if s not in self.base]
        if missing and not self._fits(missing, self.end):
            if not self._fits(sorted(slots), {kind: 0 for kind in KINDS}):
                return False
            # Start over with this step's adapters only; the others are copied again when needed.
            self.base, self.copied = {}, {}
            self.end = {kind: 0 for kind in KINDS}
            missing = sorted(slots)
        for slot in missing:
            self._copy(slot)
        key = (tables.generation, tuple(sorted((s, tuple(b.values())) for s, b in self.base.items())))
        if key != self._tables_key:
            self._write_tables()
            self._tables_key = key
        return True

    def _fits(self, slots: list[int], end: dict[str, int]) -> bool:
        totals = self.tables.max_total_rank
        return all(end[kind] + sum(totals[kind][s] for s in slots) <= self.rows[kind] for kind in KINDS)

    @torch.no_grad()
    def _copy(self, slot: int) -> None:
        """The slot's stacked A rows of every layer and kind into the next free extra rows."""
        tables = self.tables
        hidden_in = {kind: self.weights[0][kind][0].shape[1] for kind in KINDS}
        self.base[slot] = {}
        for kind in KINDS:
            base = self.end[kind]
            self.base[slot][kind] = base
            self.end[kind] += tables.max_total_rank[kind][slot]
            offsets = tables.a_offsets[kind][:, slot].tolist()
            totals = tables.total_ranks[kind][:, slot].tolist()
            for layer, (offset, total) in enumerate(zip(offsets, totals)):
                if total:
                    weight, _, hidden_out = self.weights[layer][kind]
                    a = self.pool[offset : offset + total * hidden_in[kind]].view(total, hidden_in[kind])
                    weight[hidden_out + base : hidden_out + base + total].copy_(a)
        self.copied[slot] = tables.slot_generation[slot]

    def _write_tables(self) -> None:
        """The expand's y offsets and total ranks for the placement, from the host adapter tables."""
        tables = self.tables
        for kind, parts in KINDS.items():
            base = torch.zeros(tables.capacity, dtype=torch.int64)
            for slot, bases in self.base.items():
                base[slot] = bases[kind]
            y = torch.stack([tables.y_offsets[m] for m in parts], dim=1) + base  # [layers, parts, slots]
            total = tables.total_ranks[kind].to(torch.int64) + base
            self.y_offsets[kind].copy_(y)
            self.total_ranks[kind].copy_(total.to(torch.int32))

    def layer(
        self, layer: int, kind: str
    ) -> tuple[torch.Tensor, torch.Tensor | None, int, torch.Tensor, torch.Tensor]:
        """(folded weight, folded bias or None, hidden_out, y offsets [parts, slots], total ranks
        [slots]) of one projection."""
        weight, bias, hidden_out = self.weights[layer][kind]
        return weight, bias, hidden_out, self.y_offsets[kind][layer], self.total_ranks[kind][layer]


# Per layer, per kind: (weight with the extra rows, bias with as many zeros or None, hidden_out).
FoldedWeights = list[dict[str, tuple[torch.Tensor, torch.Tensor | None, int]]]


def _rows(fold_rank: int) -> dict[str, int]:
    return {kind: len(parts) * fold_rank for kind, parts in KINDS.items()}


def fold_layers(layers: nn.ModuleList, fold_rank: int) -> FoldedWeights:
    """Move every LoRA projection's weight (and bias) into a buffer with `fold_rank` extra rows per
    part. Before the KV cache is sized from free memory, so that it leaves them room, and before
    any graph is captured: captured graphs read the weights' storage, which this replaces."""
    if fold_rank <= 0:
        raise ValueError(f"fold_rank must be positive, got {fold_rank}")
    rows = _rows(fold_rank)
    return [
        {
            kind: _fold(getattr(getattr(layer, block), name), rows[kind])
            for kind, (block, name) in _MODULES.items()
        }
        for layer in layers
    ]


@torch.no_grad()
def _fold(module: nn.Linear, rows: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Give `module` a weight (and bias) that are views of the first rows of larger buffers with
    `rows` more rows (zeros), and return those buffers and its hidden_out."""
    weight = module.weight
    if weight.dim() != 2:
        raise ValueError("folding LoRA into a projection needs its dense weight (not a packed CPU copy)")
    hidden_out, hidden_in = weight.shape
    folded = torch.zeros(hidden_out + rows, hidden_in, dtype=weight.dtype, device=weight.device)
    folded[:hidden_out].copy_(weight)
    module.weight = nn.Parameter(folded[:hidden_out], requires_grad=False)
    folded_bias = None
    if module.bias is not None:
        folded_bias = torch.zeros(hidden_out + rows, dtype=module.bias.dtype, device=module.bias.device)
        folded_bias[:hidden_out].copy_(module.bias)
        module.bias = nn.Parameter(folded_bias[:hidden_out], requires_grad=False)
    return folded, folded_bias, hidden_out
