"""The KV connector's wire format: protobuf-compatible, zero-copy on receipt, written to the right slots."""

from __future__ import annotations

import pytest
import torch

from tandem_proto.v1 import worker_pb2 as wpb
from tandem_worker.server.kv_transfer import (
    KVWriter,
    decode_kv_chunk,
    encode_kv_chunk,
    kv_chunks,
    layout_mismatch,
)


def test_encoded_chunk_is_a_valid_protobuf_kvchunk():
    k, v = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    header = wpb.KVChunk(
        layer=7, token_start=32, num_tokens=5, layout=wpb.KVLayout(model_id="m", block_size=16)
    )
    data = encode_kv_chunk(header, k, v)
    parsed = wpb.KVChunk.FromString(data)
    assert parsed.layer == 7 and parsed.token_start == 32 and parsed.layout.model_id == "m"
    assert parsed.key == k.numpy().tobytes() and parsed.value == v.numpy().tobytes()


def test_decode_returns_views_into_the_received_bytes():
    k, v = torch.randn(300, 2, 8), torch.randn(300, 2, 8)
    data = encode_kv_chunk(wpb.KVChunk(layer=1, token_start=0, num_tokens=300, first_logprob=-0.5), k, v)
    header, key, value = decode_kv_chunk(data)
    assert header.layer == 1 and header.num_tokens == 300 and header.first_logprob == -0.5
    assert key.obj is data and value.obj is data, "payloads must not be copied on receipt"
    assert bytes(key) == k.numpy().tobytes() and bytes(value) == v.numpy().tobytes()
    last, nk, nv = decode_kv_chunk(encode_kv_chunk(wpb.KVChunk(last=True, first_token=42)))
    assert last.last and last.first_token == 42 and nk is None and nv is None


def test_chunks_are_bounded_and_cover_the_range():
    k, v = torch.randn(1000, 3, 64), torch.randn(1000, 3, 64)
    msgs = [decode_kv_chunk(m) for m in kv_chunks(4, 100, k, v, max_tokens=256)]
    assert [h.token_start for h, _, _ in msgs] == [100, 356, 612, 868]
    assert [h.num_tokens for h, _, _ in msgs] == [256, 256, 256, 232]
    assert b"".join(bytes(key) for _, key, _ in msgs) == k.numpy().tobytes()


def test_writer_puts_each_token_in_its_paged_slot():
    layers, blocks, bs, heads, dim = 3, 10, 4, 2, 8
    cache = torch.zeros(2, layers, blocks, bs, heads, dim)
    table = [7, 2, 9]  # a scattered block table
    k, v = torch.randn(10, heads, dim), torch.randn(10, heads, dim)
    writer = KVWriter(cache, table, bs)
    for data in kv_chunks(2, 0, k, v, max_tokens=3):
        header, key, value = decode_kv_chunk(data)
        writer.write(header, key, value)
    for p in range(10):
        block, off = table[p // bs], p % bs
        assert torch.equal(cache[0, 2, block, off], k[p]) and torch.equal(cache[1, 2, block, off], v[p])
    assert cache[:, :2].abs().sum() == 0, "other layers untouched"
    assert writer.bytes == 2 * k.numel() * 4 and writer.messages == 4


def test_writer_refuses_a_chunk_of_the_wrong_size():
    cache = torch.zeros(2, 1, 4, 4, 2, 8)
    writer = KVWriter(cache, [0, 1], 4)
    header, key, value = decode_kv_chunk(
        encode_kv_chunk(wpb.KVChunk(num_tokens=3), torch.randn(2, 2, 8), torch.randn(2, 2, 8))
    )
    with pytest.raises(ValueError, match="expected"):
        writer.write(header, key, value)
    assert cache.abs().sum() == 0


def test_layout_mismatch_names_every_differing_field():
    a = wpb.KVLayout(
        model_id="x@1", dtype="float32", block_size=16, num_layers=30, num_kv_heads=3, head_dim=64
    )
    assert layout_mismatch(a, a) is None
    b = wpb.KVLayout(
        model_id="y@2", dtype="bfloat16", block_size=16, num_layers=30, num_kv_heads=3, head_dim=64
    )
    msg = layout_mismatch(a, b)
    assert "model_id" in msg and "dtype" in msg and "block_size" not in msg


def test_writer_takes_each_token_once_in_order_from_the_skip_and_checks_the_whole_prompt_came():
    # Tokens below the skip are the decode worker's cached prefix, shared with other sequences;
    # a stream that ends short would leave stale KV the prefix cache then serves to others.
    layers, heads, dim = 2, 2, 8
    cache = torch.zeros(2, layers, 6, 4, heads, dim)

    def chunk(layer: int, start: int, n: int):
        return decode_kv_chunk(
            encode_kv_chunk(
                wpb.KVChunk(layer=layer, token_start=start, num_tokens=n),
                torch.ones(n, heads, dim),
                torch.ones(n, heads, dim),
            )
        )

    writer = KVWriter(cache, [0, 1, 2], 4, skip_tokens=4, num_tokens=10)
    for bad, why in (((0, 0, 4), "starts at token 0, expected 4"), ((0, 8, 4), "outside the reserved")):
        with pytest.raises(ValueError, match=why):
            writer.write(*chunk(*bad))
    assert cache.abs().sum() == 0
    writer.write(*chunk(0, 4, 6))
    with pytest.raises(ValueError, match="starts at token 4, expected 10"):  # the same tokens again
        writer.write(*chunk(0, 4, 6))
    with pytest.raises(ValueError, match=r"1 layer\(s\) incomplete \(layer 1 at token 4 of 10\)"):
        writer.check_complete()
    writer.write(*chunk(1, 4, 3))
    writer.write(*chunk(1, 7, 3))
    writer.check_complete()
    assert cache[:, :, 0].abs().sum() == 0  # the skipped block: never written


def test_model_id_tells_weights_apart_anywhere_in_the_checkpoint_and_ignores_the_folder_name(tmp_path):
    # The id gates which prefill worker's KV a decode worker takes. It hashed the first MiB of each
    # file, so a fine-tune that left the embeddings alone had the base model's id; and it named
    # the folder, so the same weights under two names were refused.
    import json as _json
    import shutil

    from safetensors.torch import save_file

    from tandem_worker.server.convert import model_id

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.embed_tokens.weight": torch.randn(512, 1024, generator=g),  # 2 MiB, first in the file
        "z.layers.0.o_proj.weight": torch.randn(64, 64, generator=g),
    }
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(_json.dumps({"model_type": "llama", "hidden_size": 64}))
    save_file(tensors, str(base / "model.safetensors"))
    renamed = tmp_path / "same-weights-other-name"
    shutil.copytree(base, renamed)
    tuned = tmp_path / "base-tuned"
    tuned.mkdir()
    shutil.copy(base / "config.json", tuned / "config.json")
    changed = dict(tensors)
    changed["z.layers.0.o_proj.weight"] = tensors["z.layers.0.o_proj.weight"] * 1.01
    save_file(changed, str(tuned / "model.safetensors"))

    assert model_id(renamed) == model_id(base)
    assert model_id(tuned) != model_id(base)
    assert model_id(base).startswith("llama@")


def test_a_decode_worker_closes_channels_to_prefill_endpoints_long_unused(monkeypatch):
    # Each prefill pod that ever served it left a channel open for the worker's lifetime;
    # autoscaling and rollouts bring new addresses all the time.
    import threading

    from tandem_worker.server import worker_server

    clock = [1000.0]
    monkeypatch.setattr(worker_server.time, "monotonic", lambda: clock[0])
    state = worker_server.WorkerState.__new__(worker_server.WorkerState)
    state._channels, state._lock = {}, threading.Lock()
    state.prefill_call("10.0.0.1:50051")
    first = state._channels["10.0.0.1:50051"][0]
    clock[0] += 60
    state.prefill_call("10.0.0.2:50051")
    assert set(state._channels) == {"10.0.0.1:50051", "10.0.0.2:50051"}
    clock[0] += worker_server.IDLE_CHANNEL_SECONDS
    state.prefill_call("10.0.0.2:50051")  # in use: kept, and the same channel
    state.prefill_call("10.0.0.3:50051")
    assert set(state._channels) == {"10.0.0.2:50051", "10.0.0.3:50051"}
    with pytest.raises(ValueError):  # closed
        first.unary_unary("/x")(b"", timeout=1)
    for ch, _ in state._channels.values():
        ch.close()


def test_a_heartbeat_is_an_empty_message_with_nothing_to_write():
    # What a prefill worker sends a pull that waits its turn: zero bytes on the wire, which parse
    # back as a chunk of no tokens, not the last one (the decode side writes nothing for it).
    data = encode_kv_chunk(wpb.KVChunk())
    assert data == b""
    header, key, value = decode_kv_chunk(data)
    assert header == wpb.KVChunk() and not header.last and header.num_tokens == 0
    assert key is None and value is None
