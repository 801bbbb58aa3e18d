"""`DecodeGraphs`: decode-only steps replayed from captured CUDA graphs.

A decode step of a small model is mostly kernel-launch overhead: hundreds of small kernels per
token, each a few microseconds of CPU time to launch. Capturing the whole forward pass once per
batch size and replaying it turns those launches into one. Batches are padded up to the next
captured size; padding rows write no KV (slot -1, which `store_kvcache` skips), attend to one
position of whatever block their stale table row names, and their logits are dropped.

Everything a replay reads lives in static buffers sized for the largest batch; `run` copies the
step's inputs into them. Steps with prefill chunks, LoRA adapters or a KV layer hook (the prefill
worker streaming KV) run eagerly: their shapes vary too much to capture.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from .model import AttentionMetadata, LlamaModel

log = logging.getLogger(__name__)

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
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.logit_indices = torch.arange(max_batch, dtype=torch.int64, device=device)
        # One host buffer, pinned, for the step's per-row inputs: one host-to-device copy per step.
        pin = device.type == "cuda"
        self._host = torch.zeros(4, max_batch, dtype=torch.int64, pin_memory=pin)
        self._host_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
        self._host_np = self._host.numpy()
        self._host_tables_np = self._host_tables.numpy()
        self._graphs: dict[int, torch.cuda.CUDAGraph | _Rerun] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    def _args(self, bs: int) -> tuple:
        meta = AttentionMetadata(
            num_decode_tokens=bs,
            slot_mapping=self.slot_mapping[:bs],
            decode_block_tables=self.block_tables[:bs],
            decode_context_lens=self.context_lens[:bs],
            prefill_block_tables=None,
            prefill_cu_seqlens_q=None,
            prefill_context_lens=None,
        )
        return (self.input_ids[:bs], self.positions[:bs], self.kv_cache, meta, self.logit_indices[:bs])

    def capture(self) -> None:
        t0 = time.perf_counter()
        if self.kv_cache.device.type != "cuda":
            # No CUDA graphs off CUDA: a stand-in re-runs the same call on the same static buffers,
            # so the tests exercise padding, buffers and slot -1 on any machine.
            for bs in self.sizes:
                rerun = _Rerun(self.model, self._args(bs))
                self._graphs[bs], self._outputs[bs] = rerun, rerun.out
            return
        pool = torch.cuda.graph_pool_handle()
        # Largest first: the smaller graphs then fit in the memory the largest left in the pool.
        for bs in sorted(self.sizes, reverse=True):
            args = self._args(bs)
            # Warm up on a side stream (as capture requires): compiles the Triton kernels and lets
            # the allocator settle before anything is recorded.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.model(*args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(*args)
            self._graphs[bs] = graph
            self._outputs[bs] = out
        torch.cuda.synchronize()
        log.info(
            "captured decode CUDA graphs for batch sizes %s in %.1f s",
            ",".join(map(str, self.sizes)),
            time.perf_counter() - t0,
        )

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return 0 < num_seqs <= self.max_batch and max_blocks <= self.block_tables.shape[1]

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
    ) -> torch.Tensor:
        """One decode step: logits [len(input_ids), vocab] (a view into the graph's output)."""
        n = len(input_ids)
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        # numpy views of the pinned buffers: filling them from lists costs microseconds per step
        # where a torch.tensor per row would cost a millisecond at batch 256.
        rows = self._host_np
        rows[0, :n] = input_ids
        rows[1, :n] = positions
        rows[2, :n] = slots
        rows[2, n:bs] = -1  # padding rows write no KV
        rows[3, :n] = rows[1, :n] + 1  # context length: every position up to the new token's
        rows[3, n:bs] = 1
        width = max(len(t) for t in tables)
        table_rows = self._host_tables_np
        for i, t in enumerate(tables):
            table_rows[i, : len(t)] = t
        # The pinned buffers are rewritten by the next step: each copy must finish reading them
        # first, which the blocking copies below guarantee (they sync with the host).
        host = self._host
        self.input_ids[:bs].copy_(host[0, :bs])
        self.positions[:bs].copy_(host[1, :bs])
        self.slot_mapping[:bs].copy_(host[2, :bs])
        self.context_lens[:bs].copy_(host[3, :bs])
        self.block_tables[:n, :width].copy_(self._host_tables[:n, :width])
        self._graphs[bs].replay()
        return self._outputs[bs][:n]


class _Rerun:
    """A CUDA graph's stand-in off CUDA: `replay` runs the captured call again, into the same output."""

    def __init__(self, model: LlamaModel, args: tuple) -> None:
        self.model, self.args = model, args
        self.out = model(*args)

    @torch.inference_mode()  # the output was made under the model's inference mode
    def replay(self) -> None:
        self.out.copy_(self.model(*self.args))
