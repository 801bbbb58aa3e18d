"""The KV connector's wire side: prompt KV as bounded `KVChunk` messages, and back into a paged cache.

Parts:
- `kv_chunks()` (prefill side) cuts one layer's KV for a token range into messages of at most
  `KV_CHUNK_TOKENS` tokens; serializing a chunk is the one copy of the payload on this side;
- `KVWriter` (decode side) views each message's bytes in place and copies them straight into the
  reserved cache slots: the one copy on that side;
- `layout_mismatch()` (both sides) is the handshake rule: model identity, dtype, block size and
  shapes must agree, or the transfer is refused with FAILED_PRECONDITION.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch

from .pb import worker_pb2 as wpb

KV_CHUNK_TOKENS = 1024  # 256 tokens x 3 heads x 64 dims x 4 B x 2 = 384 KiB per message for SmolLM2

# Received KV is only read (copied into the cache), so viewing the immutable message bytes is safe.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def kv_chunks(
    layer: int, start: int, key: torch.Tensor, value: torch.Tensor, max_tokens: int = KV_CHUNK_TOKENS
) -> Iterator[wpb.KVChunk]:
    """key/value: [n, kv_heads, head_dim], contiguous, for prompt tokens [start, start + n)."""
    for lo in range(0, key.shape[0], max_tokens):
        k, v = key[lo : lo + max_tokens], value[lo : lo + max_tokens]
        yield wpb.KVChunk(
            layer=layer,
            token_start=start + lo,
            num_tokens=k.shape[0],
            key=k.numpy().tobytes(),
            value=v.numpy().tobytes(),
        )


class KVWriter:
    """Writes received chunks into one sequence's reserved blocks of a paged cache
    ([2, layers, blocks, block_size, kv_heads, head_dim])."""

    def __init__(self, kv_cache: torch.Tensor, block_table: list[int], block_size: int) -> None:
        self.kv = kv_cache
        self.table = torch.tensor(block_table)
        self.bs = block_size
        self.heads, self.dim = kv_cache.shape[-2:]
        self.bytes = 0
        self.messages = 0

    def write(self, chunk: wpb.KVChunk) -> None:
        n = chunk.num_tokens
        # Each access of a bytes field makes a new Python copy: take each payload once.
        key, value = chunk.key, chunk.value
        expected = n * self.heads * self.dim * self.kv.element_size()
        if len(key) != expected or len(value) != expected:
            raise ValueError(f"KV chunk of {n} tokens has {len(key)} key bytes, expected {expected}")
        pos = torch.arange(chunk.token_start, chunk.token_start + n)
        slots = self.table[pos // self.bs] * self.bs + pos % self.bs
        k = torch.frombuffer(key, dtype=self.kv.dtype).view(n, self.heads, self.dim)
        v = torch.frombuffer(value, dtype=self.kv.dtype).view(n, self.heads, self.dim)
        # index_put_ (see tandem_kernels.reference.store_kvcache for why not index_copy_)
        self.kv[0, chunk.layer].view(-1, self.heads, self.dim)[slots] = k
        self.kv[1, chunk.layer].view(-1, self.heads, self.dim)[slots] = v
        self.bytes += 2 * expected
        self.messages += 1


def layout_mismatch(mine: wpb.KVLayout, theirs: wpb.KVLayout) -> str | None:
    """A sentence naming every field on which two KV layouts differ, or None when they agree."""
    diffs = []
    for f in ("model_id", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim"):
        a, b = getattr(mine, f), getattr(theirs, f)
        if a != b:
            diffs.append(f"{f} {b!r} (here {a!r})")
    return "incompatible KV layout: " + ", ".join(diffs) if diffs else None
