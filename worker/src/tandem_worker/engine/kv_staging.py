"""Prefill side of disaggregation on a GPU: each layer's new KV copied to pinned host memory while
the next layers compute.

On CPU the engine hands its sinks the gathered KV directly (`ready` is None). On CUDA it uses a
`KVStager`: the gather runs on the compute stream (a snapshot, ordered before any later write to
those slots), and the device-to-host copy, the slow part (PCIe), runs on a side stream that waits
for it. The compute stream never waits on the side stream; whoever reads the host tensors calls
`ready.synchronize()` first, in its own thread (the gRPC thread sending them), so the engine thread
keeps queueing layers.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .block_manager import cache_slots
from .streams import side_stream


class KVReady(Protocol):
    """Set once staged KV can be read on the host: `torch.cuda.Event` has this shape."""

    def synchronize(self) -> None: ...


def slot_indices(block_table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Flat cache slots (block * block_size + offset) of tokens [start, end), on the CPU."""
    return torch.tensor(cache_slots(block_table, start, end, block_size), dtype=torch.int64)


class _Ready:
    """Already set: what `KVStager.stage` returns on CPU, where the gather is the copy."""

    def synchronize(self) -> None:
        pass


class KVStager:
    """Copies one layer's KV rows of a CUDA paged cache ([2, layers, blocks, block_size, kv_heads,
    head_dim]) into pinned host memory on its own stream. Usable without an engine (benchmarks).
    On a CPU device it gathers directly and returns an already-set `ready` (the engine does not
    use it there: its sinks get `ready=None`)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stream = side_stream("kv-stage", self.device) if self.device.type == "cuda" else None

    def stage(
        self, kv_cache: torch.Tensor, layer: int, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, KVReady]:
        """Queue the copy of `layer`'s K and V at `slots` (a long tensor on the cache's device) to
        the host; returns (key, value, ready): host [n, kv_heads, head_dim] tensors (pinned, on
        CUDA) that hold the KV once `ready.synchronize()` (a `torch.cuda.Event`) returns. Call it
        after the layer's KV write was queued on the current (compute) stream; the host never
        blocks here."""
        heads, dim = kv_cache.shape[-2:]
        if self.stream is None:
            k = kv_cache[0, layer].view(-1, heads, dim).index_select(0, slots)
            v = kv_cache[1, layer].view(-1, heads, dim).index_select(0, slots)
            return k, v, _Ready()
        compute = torch.cuda.current_stream(self.device)
        # The gather stays on the compute stream, in order with the cache writes: once this step
        # ends, the scheduler may free these blocks (the prefill request finished, or was preempted)
        # and the next step may overwrite them. A gather on the side stream would only be ordered
        # after this layer's write, not before those later ones, so it could read someone else's
        # KV. It is one small memory-bound kernel per layer; the PCIe copy is what we overlap.
        gathered = kv_cache[:, layer].view(2, -1, heads, dim).index_select(1, slots)  # [2, n, h, d]
        # Pinned, or a non_blocking device-to-host copy silently becomes a synchronous one. PyTorch's
        # caching host allocator reuses these blocks across steps (no cudaHostAlloc per layer).
        host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
        written = torch.cuda.Event()
        written.record(compute)
        self.stream.wait_event(written)  # the side stream waits for the gather; never the reverse
        with torch.cuda.stream(self.stream):
            host.copy_(gathered, non_blocking=True)
        # `gathered` came from the compute stream's pool: when our reference drops (on return),
        # the caching allocator would hand its memory to the next compute-stream allocation at
        # once, and compute kernels could overwrite it before the side stream has copied it out.
        # record_stream makes the allocator wait for the side stream's work queued so far first.
        # (`host` needs no such care: a non_blocking copy records an event with the caching host
        # allocator, so its block is not reused before the copy ends even if the reader drops it.)
        gathered.record_stream(self.stream)
        # blocking=True: the reader (a gRPC thread) sleeps in synchronize() instead of spinning a
        # core the engine and network threads need.
        ready = torch.cuda.Event(blocking=True)
        ready.record(self.stream)
        return host[0], host[1], ready
