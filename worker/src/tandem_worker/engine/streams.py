"""The CUDA streams Tandem uses beside each device's default one: one per role, per process and
device, taken once.

`torch.cuda.Stream()` does not create a stream. It hands out the next of a fixed pool (32 per
device and priority) in turn, so streams taken per use come back around: taken per KV transfer,
the 2nd transfer of a decode worker got the stream its CUDA graphs were captured on, and a LoRA
graph captured while serving would have recorded that transfer's copies (then replayed them
every step, into blocks other sequences own by then); the 17th got the LoRA side stream. Taking
one stream per role keeps the roles apart, provided nothing else in the process draws from the
pool: tests/engine/test_streams.py checks that no other module of ours calls torch.cuda.Stream.
"""

from __future__ import annotations

import threading

import torch

ROLES = (
    "graph-capture",  # CUDA graph warm-up and capture (DecodeGraphs)
    "lora",  # LoRA shrinks beside the base projections (LoRABatch.project)
    "kv-stage",  # device-to-host copies of a prefill's KV (KVStager)
    "kv-write",  # host-to-device writes of received KV (KVWriter), shared by all transfers
)

_streams: dict[tuple[str, int], torch.cuda.Stream] = {}
_lock = threading.Lock()


def side_stream(role: str, device: torch.device | str | int) -> torch.cuda.Stream:
    """This process's stream for `role` on a CUDA `device`, the same one on every call."""
    if role not in ROLES:
        raise ValueError(f"unknown stream role {role!r}; roles: {', '.join(ROLES)}")
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"side streams are CUDA streams, not {device}")
    index = torch.cuda.current_device() if device.index is None else device.index
    with _lock:  # KV transfers ask from gRPC threads
        stream = _streams.get((role, index))
        if stream is None:
            stream = _streams[(role, index)] = torch.cuda.Stream(device=index)
    return stream
