"""`DecodeGraphs`: decode-only steps replayed from captured CUDA graphs.

A decode step of a small model is mostly kernel-launch overhead: hundreds of small kernels per
token, each a few microseconds of CPU time to launch. Capturing the whole forward pass once per
batch size and replaying it turns those launches into one. Batches are padded up to the next
captured size; padding rows write no KV (slot -1, which `store_kvcache` skips), attend to one
position of whatever block their stale table row names, and their logits are dropped.

Everything a replay reads lives in static buffers sized for the largest batch; `run` copies the
step's inputs into them. Steps with prefill chunks or a KV layer hook (the prefill worker
streaming KV) run eagerly: their shapes vary too much to capture.

Decode steps with LoRA adapters replay graphs of their own (`use_lora`), captured at start-up when
the worker has an adapter store (`capture_lora`), else the first time a batch size needs one. Their
LoRA kernels use the tiled launch (`tandem_kernels.lora_token_tiles`), whose grid depends only on
the batch size, so one graph serves any mix of adapters: the step's token groups go into static
buffers like the other inputs, the adapters' offset tables are updated in place
(`LoRATables.on_device`), and their ranks are bounded by the graph's (`max_lora_rank`; batches with
a larger adapter run eagerly). A capacity change of the tables reallocates them, and the LoRA
graphs are captured again. With folded weights (`use_lora`), a second set of LoRA graphs serves the
steps whose adapters fit in the projections' extra weight rows, the LoRA shrink folded into the
base GEMMs (lora_fold.py); the others replay the first set.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from tandem_kernels.lora_reference import TILE_ROWS, HostGroups, tile_bounds

from .lora import KINDS, LoRABatch, LoRAManager
from .lora_fold import FoldedWeights, LoRAFold
from .model import AttentionMetadata, LlamaModel
from .streams import side_stream

log = logging.getLogger(__name__)

# Adapter slots the LoRA tables have when the LoRA graphs are captured at start-up: more adapters
# resident at once reallocate the tables, and the graphs that read them are captured again.
LORA_GRAPH_SLOTS = 64

# Dense where batches are small (each padded row costs a whole row of work), coarser above.
CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def capture_sizes(max_batch: int) -> list[int]:
    """The batch sizes to capture for decode batches of up to `max_batch` sequences."""
    sizes = [b for b in CAPTURE_SIZES if b < max_batch]
    return sizes + [max_batch] if max_batch > 0 else []


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,
        max_batch: int,
        max_blocks_per_seq: int,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = capture_sizes(max_batch)
        self.max_batch = max_batch
        device = kv_cache.device
        # The step's per-row inputs (token, position, KV slot, context length) are the rows of one
        # tensor, so one host-to-device copy moves them all; the kernels take context lengths as
        # int32, cast from the last row on the device.
        self._rows = torch.zeros(4, max_batch, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self._rows[0], self._rows[1], self._rows[2]
        self.slot_mapping.fill_(-1)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.logit_indices = torch.arange(max_batch, dtype=torch.int64, device=device)
        # Every graph writes its logits here, so one buffer for the largest batch serves them all
        # (at Llama-3-8B's vocabulary and sizes up to 256, each graph's own output would add up to
        # about 0.65 GB, twice that with the LoRA graphs). A step's logits are read before the
        # next replay, which rewrites them. Made at the first capture.
        self.logits: torch.Tensor | None = None
        # Their host side, pinned (copies from it are asynchronous), filled through numpy views.
        pin = device.type == "cuda"
        self._host = torch.zeros(4, max_batch, dtype=torch.int64, pin_memory=pin)
        self._host_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
        self._host_np = self._host.numpy()
        self._host_tables_np = self._host_tables.numpy()
        # The block table each host row holds, and its length then: a row is rewritten only when
        # its sequence or its length changed (tables only ever grow by appending, see
        # BlockManager.grow), which at batch 256 saves most of a step's filling.
        self._row_tables: list[list[int] | None] = [None] * max_batch
        self._row_lens = [0] * max_batch
        self._copied: torch.cuda.Event | None = None  # the last step's copies out of the host buffers
        self._graphs: dict[int, torch.cuda.CUDAGraph | _Rerun] = {}
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.lora: LoRAManager | None = None
        self.max_lora_rank = 0
        self._lora_graphs: dict[int, torch.cuda.CUDAGraph | _Rerun] = {}
        self._lora_version = -1
        # With a fold rank: graphs whose projections run with the step's adapters folded in (lora_fold.py).
        self.fold: LoRAFold | None = None
        self._fold_graphs: dict[int, torch.cuda.CUDAGraph | _Rerun] = {}

    def use_lora(self, manager: LoRAManager, max_rank: int, folded: FoldedWeights | None = None) -> None:
        """Replay decode steps with adapters of rank <= max_rank too (0: run them eagerly).

        `folded`: the model's projection weights as `fold_layers` moved them, before the base graphs
        were captured (ModelRunner does so): steps whose adapters fit in their extra rows then
        replay graphs with the LoRA shrink folded into the base GEMMs (`LoRAFold`)."""
        self.lora, self.max_lora_rank = manager, max_rank
        if folded is not None and self.fold is None:
            self.fold = LoRAFold(folded, manager.tables, manager.pool)
        device, n = self.kv_cache.device, self.max_batch
        # The step's token groups (lora_token_groups' layout), padded to the batch size: one group
        # per row at most, the unused ones empty at the end; and the tiles over them.
        # The three int32 ones are views of one buffer, [offsets | slots | tiles], so a step moves
        # them in one copy, and the int64 indices in another: both whole, contiguous and in their
        # own dtype, from pinned memory, hence asynchronous (a slice, or a copy that converts,
        # goes through a pageable temporary and blocks the host until the device has it).
        num_tiles = -(-n // TILE_ROWS)
        self.lora_token_indices = torch.zeros(n, dtype=torch.int64, device=device)
        self._lora_i32 = torch.zeros(2 * n + 1 + 2 * num_tiles, dtype=torch.int32, device=device)
        self.lora_group_offsets = self._lora_i32[: n + 1]
        self.lora_group_slots = self._lora_i32[n + 1 : 2 * n + 1]
        self.lora_tiles = self._lora_i32[2 * n + 1 :].view(num_tiles, 2)
        pin = device.type == "cuda"
        self._lora_host_indices = torch.zeros(n, dtype=torch.int64, pin_memory=pin)
        self._lora_host_i32 = torch.zeros(self._lora_i32.shape, dtype=torch.int32, pin_memory=pin)

    def _args(self, bs: int, lora: bool = False, fold: bool = False) -> tuple:
        meta = AttentionMetadata(
            num_decode_tokens=bs,
            slot_mapping=self.slot_mapping[:bs],
            decode_block_tables=self.block_tables[:bs],
            decode_context_lens=self.context_lens[:bs],
            prefill_block_tables=None,
            prefill_cu_seqlens_q=None,
            prefill_context_lens=None,
        )
        if lora:
            meta.lora = self._lora_batch(bs, fold)
        return (self.input_ids[:bs], self.positions[:bs], self.kv_cache, meta, self.logit_indices[:bs])

    def _lora_batch(self, bs: int, fold: bool = False) -> LoRABatch:
        groups = (self.lora_token_indices[:bs], self.lora_group_offsets[: bs + 1], self.lora_group_slots[:bs])
        # Each projection's shrink is sized for the largest adapter the graph serves.
        max_rank = {kind: self.max_lora_rank * len(parts) for kind, parts in KINDS.items()}
        manager = self.lora
        tables = manager.tables.on_device()
        tiles = self.lora_tiles[: -(-bs // TILE_ROWS)]
        return LoRABatch(
            manager.pool,
            tables,
            groups,
            max_rank,
            manager.shapes,
            tiles=tiles,
            stream=manager.stream,
            fold=self.fold if fold else None,
            max_part_rank=self.max_lora_rank,
        )

    def _capture(self, bs: int, lora: bool, fold: bool = False) -> torch.cuda.CUDAGraph | _Rerun:
        """A graph of one decode step at batch size `bs`, writing its logits into `self.logits[:bs]`."""
        if self.logits is None:
            vocab = self.model.config.vocab_size
            self.logits = torch.empty(self.max_batch, vocab, dtype=torch.float32, device=self.kv_cache.device)
        args, out = self._args(bs, lora, fold), self.logits[:bs]

        def call() -> None:
            self.model(*args, logits_out=out)

        if self.kv_cache.device.type != "cuda":
            # No CUDA graphs off CUDA: a stand-in re-runs the same call on the same static buffers,
            # so the tests exercise padding, buffers and slot -1 on any machine.
            call()
            return _Rerun(call)
        # Warm up off the default stream (as capture requires): compiles the Triton kernels and
        # lets the allocator settle before anything is recorded. Capture on this process's own
        # capture stream, which no other work is ever queued on (streams.py).
        side = side_stream("graph-capture", self.kv_cache.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a LoRA graph is captured while serving, when other threads (KV transfers)
        # may be calling into CUDA on their own streams; their calls are not part of this capture.
        with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
            call()
        return graph

    def capture(self) -> None:
        t0 = time.perf_counter()
        # Largest first: the smaller graphs then fit in the memory the largest left in the pool.
        for bs in sorted(self.sizes, reverse=True):
            self._graphs[bs] = self._capture(bs, lora=False)
        if self.kv_cache.device.type == "cuda":
            torch.cuda.synchronize()
            log.info(
                "captured decode CUDA graphs for batch sizes %s in %.1f s",
                ",".join(map(str, self.sizes)),
                time.perf_counter() - t0,
            )

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return 0 < num_seqs <= self.max_batch and max_blocks <= self.block_tables.shape[1]

    def lora_fits(self, lora_slots: list[int | None]) -> bool:
        """Whether a LoRA graph can run these adapters: each projection's stacked rank (q, k and v
        together) within the graph's, which sized the shrink's output."""
        if self.lora is None or self.max_lora_rank <= 0:
            return False
        totals = self.lora.tables.max_total_rank
        return all(
            totals[kind][slot] <= self.max_lora_rank * len(parts)
            for slot in set(lora_slots)
            if slot is not None
            for kind, parts in KINDS.items()
        )

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        lora_slots: list[int | None] | None = None,
    ) -> torch.Tensor:
        """One decode step: logits [len(input_ids), vocab], a view into `self.logits` (the next
        step overwrites it).

        lora_slots: each row's adapter slot (None: the base model); `lora_fits` must hold."""
        n = len(input_ids)
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        self._wait_for_host_buffers()
        # numpy views of the pinned buffers: filling them from lists costs microseconds per step
        # where a torch.tensor per row would cost a millisecond at batch 256.
        rows = self._host_np
        rows[0, :n] = input_ids
        rows[1, :n] = positions
        rows[2, :n] = slots
        rows[2, n:bs] = -1  # padding rows write no KV
        rows[3, :n] = rows[1, :n] + 1  # context length: every position up to the new token's
        rows[3, n:bs] = 1
        table_rows, row_tables, row_lens = self._host_tables_np, self._row_tables, self._row_lens
        for i, t in enumerate(tables):
            length = len(t)
            if t is not row_tables[i] or length != row_lens[i]:
                table_rows[i, :length] = t
                row_tables[i], row_lens[i] = t, length
        self._rows.copy_(self._host, non_blocking=True)
        self.context_lens.copy_(self._rows[3])
        # Whole rows: a contiguous copy, so asynchronous from pinned memory (the columns past a
        # row's length are never read: context_lens bound them).
        self.block_tables[:n].copy_(self._host_tables[:n], non_blocking=True)
        if lora_slots is None or all(s is None for s in lora_slots):
            self._record_host_copies()
            self._graphs[bs].replay()
            return self.logits[:n]
        self._fill_lora(lora_slots, bs)
        self._record_host_copies()
        self._check_lora_version()
        fold = self.fold is not None and self.fold.place({s for s in lora_slots if s is not None})
        graphs = self._fold_graphs if fold else self._lora_graphs
        if bs not in graphs:
            # Captured now, on this step's inputs (already in the buffers, so the capture's warm-up
            # writes the very KV the replay writes, never another sequence's).
            t0 = time.perf_counter()
            graphs[bs] = self._capture(bs, lora=True, fold=fold)
            log.info(
                "captured a LoRA decode CUDA graph (%s) for batch size %d in %.2f s",
                "folded" if fold else "unfolded",
                bs,
                time.perf_counter() - t0,
            )
        graphs[bs].replay()
        return self.logits[:n]

    def capture_lora(self) -> None:
        """Capture the LoRA graph of every batch size now (a worker with an adapter store expects
        adapters), rather than at each size's first step with adapters, which would stall the
        running requests for the capture. The graphs are captured with no adapter rows: their
        grids do not depend on the metadata."""
        t0 = time.perf_counter()
        tables = self.lora.tables
        if tables.capacity < LORA_GRAPH_SLOTS:
            tables.grow(LORA_GRAPH_SLOTS)  # growing later would mean capturing again, mid-serving
        self._check_lora_version()
        for fold, graphs in ((False, self._lora_graphs), (True, self._fold_graphs)):
            if fold and self.fold is None:
                continue
            for bs in sorted(self.sizes, reverse=True):
                if bs not in graphs:
                    self._wait_for_host_buffers()
                    self._fill_lora([None] * bs, bs)
                    self._record_host_copies()
                    graphs[bs] = self._capture(bs, lora=True, fold=fold)
        if self.kv_cache.device.type == "cuda":
            torch.cuda.synchronize()
            log.info("captured LoRA decode CUDA graphs in %.1f s", time.perf_counter() - t0)

    def _check_lora_version(self) -> None:
        """Bring the adapters' device tables up to date (in place); drop the LoRA graphs when the
        tables were reallocated, which the graphs read by address."""
        tables = self.lora.tables
        tables.on_device()
        if self._lora_version != tables.version:
            self._lora_graphs.clear()
            self._fold_graphs.clear()
            if self.fold is not None:
                self.fold.resize()
            self._lora_version = tables.version

    def _wait_for_host_buffers(self) -> None:
        """Block until the last step's copies have read the pinned host buffers, which the next
        step is about to refill."""
        if self._copied is not None:
            self._copied.synchronize()

    def _record_host_copies(self) -> None:
        if self.kv_cache.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _fill_lora(self, lora_slots: list[int | None], bs: int) -> None:
        """The step's token groups into the static LoRA buffers, padded to the batch size: empty
        groups up to `bs`, after the real ones. Only the first `bs` rows (and bs + 1 offsets) are
        read by the graph of that size; the rest are copied as they are."""
        groups = HostGroups([1] * len(lora_slots), lora_slots)  # the engine's grouping, on the host
        rows, group_slots = groups.token_indices.numpy(), groups.slots
        num_groups = len(group_slots)
        bounds = groups.bounds + [len(rows)] * (bs - num_groups)
        tiles = tile_bounds(bounds, bs)
        n = self.max_batch
        indices, i32 = self._lora_host_indices.numpy(), self._lora_host_i32.numpy()
        indices[: len(rows)] = rows
        indices[len(rows) : bs] = 0
        i32[: bs + 1] = bounds
        i32[n + 1 : n + 1 + bs] = 0
        i32[n + 1 : n + 1 + num_groups] = group_slots
        at = 2 * n + 1
        i32[at : at + 2 * len(tiles)] = np.asarray(tiles, dtype=np.int32).reshape(-1)
        self.lora_token_indices.copy_(self._lora_host_indices, non_blocking=True)
        self._lora_i32.copy_(self._lora_host_i32, non_blocking=True)


class _Rerun:
    """A CUDA graph's stand-in off CUDA: `replay` runs the captured call again, on the same buffers."""

    def __init__(self, call: Callable[[], None]) -> None:
        self.replay = call
