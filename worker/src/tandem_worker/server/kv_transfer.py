"""The KV connector's wire side: prompt KV as bounded `KVChunk` messages, and back into a paged cache.

Parts:
- `kv_chunks()` (prefill side) cuts one layer's KV for a token range into messages of at most
  `KV_CHUNK_TOKENS` tokens, already encoded: the payload is copied once, from the gathered KV
  straight into the message bytes the socket sends (no protobuf object holds it);
- `decode_kv_chunk()` (decode side) parses the small header fields with protobuf and returns the
  payloads as views into the received bytes, which `KVWriter` copies straight into the reserved
  cache slots: the one copy on that side (on a GPU: into a pinned staging buffer, then by DMA on a
  side stream; `KVWriter.finish()` waits for those before the engine may read the KV);
- the encoding is exactly protobuf's for `KVChunk`, so any protobuf client can still parse it;
- `prefill_method_handler()` / `prefill_stub()` register and call `KVTransfer.Prefill` with these
  (de)serializers instead of the generated ones;
- `layout_mismatch()` (both sides) is the handshake rule: model identity, dtype, block size and
  shapes must agree, or the transfer is refused with FAILED_PRECONDITION;
- `adapter_mismatch()` (decode side) is its rule for the request's LoRA adapter: the KV must have
  been computed with the version of the adapter the decode worker continues with.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch

from ..engine.lora import short_digest
from ..engine.streams import side_stream
from .pb import worker_pb2 as wpb

KV_CHUNK_TOKENS = 512  # 512 tokens x 3 heads x 64 dims x 4 B x 2 = 768 KiB per message for SmolLM2

# Received KV is only read (copied into the cache), so viewing the immutable message bytes is safe.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


PREFILL_METHOD = "/tandem.v1.KVTransfer/Prefill"
_KEY, _VALUE = 5, 6  # KVChunk's payload field numbers


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def encode_kv_chunk(
    header: wpb.KVChunk, key: torch.Tensor | None = None, value: torch.Tensor | None = None
) -> bytes:
    """`header` (no payload fields) plus key/value appended as protobuf fields 5 and 6, in one join."""
    parts: list[bytes | memoryview] = [header.SerializeToString()]
    for field, t in ((_KEY, key), (_VALUE, value)):
        if t is not None:
            if t.device.type != "cpu":  # a synchronous copy; the engine stages KV to host first
                t = t.cpu()
            # Raw bytes, as uint8: numpy has no bfloat16 (the dtype of a CUDA cache). A view: no copy.
            buf = memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()).cast("B")
            parts += [_varint(field << 3 | 2), _varint(len(buf)), buf]
    return b"".join(parts)


def decode_kv_chunk(data: bytes) -> tuple[wpb.KVChunk, memoryview | None, memoryview | None]:
    """Header fields parsed by protobuf; key and value as views into `data` (no copy)."""
    view = memoryview(data)
    payload: dict[int, memoryview] = {}
    header = bytearray()
    i = 0
    while i < len(view):
        start = i
        tag, i = _read_varint(view, i)
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            n, i = _read_varint(view, i)
            if field in (_KEY, _VALUE):
                payload[field] = view[i : i + n]
            else:
                header += view[start : i + n]
            i += n
        elif wire == 0:
            _, i = _read_varint(view, i)
            header += view[start:i]
        elif wire == 5:
            i += 4
            header += view[start:i]
        elif wire == 1:
            i += 8
            header += view[start:i]
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in a KV chunk")
    return wpb.KVChunk.FromString(bytes(header)), payload.get(_KEY), payload.get(_VALUE)


def kv_chunks(
    layer: int, start: int, key: torch.Tensor, value: torch.Tensor, max_tokens: int = KV_CHUNK_TOKENS
) -> Iterator[bytes]:
    """Encoded messages for key/value [n, kv_heads, head_dim] of prompt tokens [start, start + n)."""
    for lo in range(0, key.shape[0], max_tokens):
        k, v = key[lo : lo + max_tokens], value[lo : lo + max_tokens]
        header = wpb.KVChunk(layer=layer, token_start=start + lo, num_tokens=k.shape[0])
        yield encode_kv_chunk(header, k, v)


def prefill_method_handler(behavior: Callable[..., Iterator[bytes]]) -> grpc.GenericRpcHandler:
    """Serve `KVTransfer.Prefill` with a servicer method that yields already-encoded chunks."""
    return grpc.method_handlers_generic_handler(
        "tandem.v1.KVTransfer",
        {
            "Prefill": grpc.unary_stream_rpc_method_handler(
                behavior,
                request_deserializer=wpb.PrefillRequest.FromString,
                response_serializer=lambda b: b,
            )
        },
    )


def prefill_stub(channel: grpc.Channel) -> Callable[..., Iterator[tuple[wpb.KVChunk, Any, Any]]]:
    """Call `KVTransfer.Prefill`; each streamed item is `decode_kv_chunk()`'s (header, key, value)."""
    return channel.unary_stream(
        PREFILL_METHOD,
        request_serializer=wpb.PrefillRequest.SerializeToString,
        response_deserializer=decode_kv_chunk,
    )


class KVWriter:
    """Writes received chunks into one sequence's reserved blocks of a paged cache
    ([2, layers, blocks, block_size, kv_heads, head_dim]).

    On a CUDA cache, `write()` only queues the work: each payload is copied into a pinned staging
    buffer, then to the device and into its slots on a side stream, so the next chunk's bytes are
    read from the network while the last ones cross PCIe, and the engine's stream never waits.
    Call `finish()` before the engine may read the blocks (or free them, on failure)."""

    def __init__(
        self,
        kv_cache: torch.Tensor,
        block_table: list[int],
        block_size: int,
        skip_tokens: int = 0,
        num_tokens: int | None = None,
    ) -> None:
        """`skip_tokens`: the first tokens' KV is already there (this worker's prefix-cache hits,
        shared with other sequences: never written); `num_tokens`: the prompt's length, whose KV
        must all arrive (`check_complete`); by default as many as the blocks hold."""
        self.kv = kv_cache
        self.bs = block_size
        self.heads, self.dim = kv_cache.shape[-2:]
        self.capacity = len(block_table) * block_size  # tokens the reserved blocks hold
        self.end = self.capacity if num_tokens is None else min(num_tokens, self.capacity)
        # Per layer, the next token expected: chunks arrive in order, each position exactly once.
        self._next = [skip_tokens] * kv_cache.shape[1]
        self.bytes = 0
        self.messages = 0
        self._stream: torch.cuda.Stream | None = None
        if kv_cache.device.type == "cuda":
            # One stream for every transfer of this process (streams.py: one taken per transfer
            # would come round to the stream CUDA graphs are captured on). Transfers share it:
            # their copies cross one PCIe link in turn anyway.
            self._stream = side_stream("kv-write", kv_cache.device)
            # The reserved blocks may have been another sequence's until this step. The engine's
            # steps end in a host sync (sampling), so its writes to them are done; still, order ours
            # after all work already queued on the default stream (this thread's current one, and
            # the engine's), so that stays true if steps ever overlap. A device-side wait only.
            self._stream.wait_stream(torch.cuda.current_stream(kv_cache.device))
            with torch.cuda.stream(self._stream):
                # From pinned memory, so non_blocking really is (a pageable source would make the
                # copy synchronous). The temporary pinned block is not reused before the copy ends:
                # a non_blocking copy records an event with PyTorch's caching host allocator.
                self.table = (
                    torch.tensor(block_table, dtype=torch.long)
                    .pin_memory()
                    .to(kv_cache.device, non_blocking=True)
                )
        else:
            self.table = torch.tensor(block_table)

    def write(self, chunk: wpb.KVChunk, key: Any, value: Any) -> None:
        """`key`/`value`: the payload bytes (views are fine), [num_tokens, kv_heads, head_dim]."""
        n = chunk.num_tokens
        expected = n * self.heads * self.dim * self.kv.element_size()
        if key is None or value is None or len(key) != expected or len(value) != expected:
            got = None if key is None else len(key)
            raise ValueError(f"KV chunk of {n} tokens has {got} key bytes, expected {expected}")
        # Checked here, on the host: on a GPU an out-of-range index is a device-side assert that
        # takes the whole worker down, not an exception for this request. Below the skip are
        # shared prefix blocks, which a write would corrupt for every sequence reading them.
        if chunk.layer >= self.kv.shape[1] or chunk.token_start + n > self.end:
            raise ValueError(
                f"KV chunk for layer {chunk.layer}, tokens [{chunk.token_start}, {chunk.token_start + n}) "
                f"is outside the reserved cache ({self.kv.shape[1]} layers, {self.end} tokens)"
            )
        if chunk.token_start != self._next[chunk.layer]:
            raise ValueError(
                f"KV chunk for layer {chunk.layer} starts at token {chunk.token_start}, "
                f"expected {self._next[chunk.layer]} (chunks must cover the prompt in order, once)"
            )
        self._next[chunk.layer] += n
        k = torch.frombuffer(key, dtype=self.kv.dtype).view(n, self.heads, self.dim)
        v = torch.frombuffer(value, dtype=self.kv.dtype).view(n, self.heads, self.dim)
        if self._stream is None:
            slots = self._slots(chunk.token_start, n)
            # One thread: this runs on a gRPC thread beside gRPC's own I/O threads and the engine's,
            # and a copy this size would otherwise wake an OpenMP team that has to wait for cores
            # they hold (measured on 2 cores: 0.83 GB/s over gRPC with it, 1.58 without). The
            # setting is per thread once a thread has run an op; it is restored all the same.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                # index_put_ (see tandem_kernels.reference.store_kvcache for why not index_copy_)
                self.kv[0, chunk.layer].view(-1, self.heads, self.dim)[slots] = k
                self.kv[1, chunk.layer].view(-1, self.heads, self.dim)[slots] = v
            finally:
                torch.set_num_threads(threads)
        else:
            self._write_device(chunk.layer, chunk.token_start, k, v)
        self.bytes += 2 * expected
        self.messages += 1

    def _write_device(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[0]
        # The message bytes are pageable (and gone once the caller moves on): one host copy into
        # pinned memory lets the host-to-device copy run asynchronously. Dropping `staging` at the
        # end is safe: the caching host allocator does not reuse it before the queued copy ends.
        staging = torch.empty((2, n, self.heads, self.dim), dtype=self.kv.dtype, pin_memory=True)
        staging[0].copy_(k)
        staging[1].copy_(v)
        device = self.kv.device
        with torch.cuda.stream(self._stream):
            # Everything below is allocated and used on the side stream only, so the caching device
            # allocator reuses its memory for later side-stream work alone, which runs after it.
            kv = staging.to(device, non_blocking=True)
            slots = self._slots(start, n)
            self.kv[0, layer].view(-1, self.heads, self.dim)[slots] = kv[0]
            self.kv[1, layer].view(-1, self.heads, self.dim)[slots] = kv[1]

    def _slots(self, start: int, n: int) -> torch.Tensor:
        """Cache slots of prompt tokens [start, start + n), on the table's device."""
        pos = torch.arange(start, start + n, device=self.table.device)
        return self.table[pos // self.bs] * self.bs + pos % self.bs

    def check_complete(self) -> None:
        """Raise ValueError unless every layer's KV arrived up to `num_tokens`: a stream that ends
        short would leave blocks of stale KV that the prefix cache then hands to other requests."""
        short = [(layer, at) for layer, at in enumerate(self._next) if at != self.end]
        if short:
            layer, at = short[0]
            raise ValueError(
                f"KV stream ended with {len(short)} layer(s) incomplete "
                f"(layer {layer} at token {at} of {self.end})"
            )

    def finish(self) -> None:
        """Wait until every chunk written so far is in the cache (nothing to wait for on CPU)."""
        if self._stream is None:
            return
        # An event, not stream.synchronize(): other transfers share the stream, and what they
        # queue on it after this point need not be waited for.
        done = torch.cuda.Event(blocking=True)
        done.record(self._stream)
        done.synchronize()


def layout_mismatch(mine: wpb.KVLayout, theirs: wpb.KVLayout) -> str | None:
    """A sentence naming every field on which two KV layouts differ, or None when they agree."""
    diffs = []
    for f in ("model_id", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim"):
        a, b = getattr(mine, f), getattr(theirs, f)
        if a != b:
            diffs.append(f"{f} {b!r} (here {a!r})")
    return "incompatible KV layout: " + ", ".join(diffs) if diffs else None


def adapter_mismatch(adapter: str, mine: str, theirs: str) -> str | None:
    """A sentence naming `adapter` and both digests when the prefill worker computed the KV with
    other files for it (`theirs`) than the decode worker holds (`mine`), else None. Phrased as a
    layout mismatch: the router retries such a refusal on another pair without taking either worker
    out of rotation, as neither is broken (one holds an older or newer copy of the adapter). No
    digest on either side is no mismatch: a base-model request, or an older peer that does not
    send one (a rolling upgrade)."""
    if not adapter or not mine or not theirs or mine == theirs:
        return None
    return (
        f"incompatible KV layout: adapter {adapter!r} version {short_digest(theirs)} "
        f"(here {short_digest(mine)}): the two workers read different files for it"
    )
