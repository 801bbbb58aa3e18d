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


@contextlib.contextmanager
def prefill_puller(address: str) -> Iterator[Callable[..., Iterator]]:
    """The KV pull of the prefill worker at `address`, as a decode worker calls it."""
    channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
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
