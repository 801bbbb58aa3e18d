"""A prefill worker's KVTransfer service served from this process, and the pulls a decode worker
would send it: for tests that hold or inspect the prefill side's engine."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from tandem_proto.v1 import inference_pb2 as pb
from tandem_proto.v1 import worker_pb2 as wpb
from tandem_worker.server.kv_transfer import prefill_method_handler, prefill_stub
from tandem_worker.server.worker_server import GRPC_OPTIONS, KVTransferService, WorkerState

from .procs import HOST


@contextlib.contextmanager
def prefill_server(state: WorkerState, threads: int = 4) -> Iterator[str]:
    """`state`'s KVTransfer service on a loopback port; yields its address."""
    server = grpc.server(ThreadPoolExecutor(threads), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((prefill_method_handler(KVTransferService(state).Prefill),))
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        yield f"{HOST}:{port}"
    finally:
        server.stop(None)


# A reader whose transport takes no more than HTTP/2's initial window (64 KiB) before it reads:
# with the workers' 8 MiB lookahead and window growth, gRPC's buffers could take a whole short
# prompt's KV (80 tokens of SmolLM2 are 3.7 MB) from a reader that reads nothing, so that its
# prefill ran to the end after all (a test that relied on it being held back failed under load).
SMALL_WINDOWS = [o for o in GRPC_OPTIONS if o[0] != "grpc.http2.lookahead_bytes"] + [
    ("grpc.http2.bdp_probe", 0)
]


@contextlib.contextmanager
def prefill_puller(address: str, small_windows: bool = False) -> Iterator[Callable[..., Iterator]]:
    """The KV pull of the prefill worker at `address`, as a decode worker calls it (`small_windows`:
    one whose transport buffers little for a reader that stops reading)."""
    channel = grpc.insecure_channel(address, options=SMALL_WINDOWS if small_windows else GRPC_OPTIONS)
    try:
        yield prefill_stub(channel)
    finally:
        channel.close()


def prefill_request(layout: wpb.KVLayout, rid: str, n: int, skip: int = 0) -> wpb.PrefillRequest:
    """A pull of the prompt 1..n for one greedy token, of which the decode worker holds `skip`."""
    return wpb.PrefillRequest(
        request_id=rid,
        layout=layout,
        prompt_token_ids=list(range(1, n + 1)),
        sampling=pb.SamplingParams(max_tokens=1, temperature=0.0),
        skip_tokens=skip,
    )
