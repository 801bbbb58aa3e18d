"""A small client of the Inference API (what `tandem generate --endpoint` uses)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, CancelledError, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import grpc

from ..engine.sampling_params import SamplingParams
from .convert import FINISH_FROM_PB, params_to_pb, prompt_logprobs_from_pb, top_logprobs_from_pb
from .pb import inference_pb2 as pb
from .pb import inference_pb2_grpc as pbgrpc


@dataclass
class Completion:
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str = ""
    logprobs: list[float] = field(default_factory=list)
    # Per position, (token id, logprob) of its most likely tokens, when top_logprobs was asked for.
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # With prompt_logprobs: each prompt token's log-probability (None for the first) and, when asked
    # for, its position's most likely tokens.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def build_request(
    prompt: str | list[int] | list[dict[str, str]],
    params: SamplingParams,
    chat: bool = False,
    request_id: str = "",
    adapter: str = "",
) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=request_id, sampling=params_to_pb(params), adapter=adapter or "")
    if isinstance(prompt, str) and not chat:
        req.text = prompt
    elif isinstance(prompt, str):
        req.chat.messages.add(role="user", content=prompt)
    elif prompt and isinstance(prompt[0], dict):
        for m in prompt:  # type: ignore[union-attr]
            req.chat.messages.add(role=m["role"], content=m["content"], name=m.get("name") or "")
    else:
        req.token_ids.ids.extend(prompt)  # type: ignore[arg-type]
    return req


class Client:
    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.stub = pbgrpc.InferenceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stream(
        self, request: pb.GenerateRequest, timeout: float | None = None
    ) -> Iterator[pb.GenerateResponse]:
        return self.stub.Generate(request, timeout=timeout)

    def complete(self, request: pb.GenerateRequest, timeout: float | None = None) -> Completion:
        return _collect(self.stream(request, timeout))

    def complete_all(
        self, requests: list[pb.GenerateRequest], timeout: float | None = None
    ) -> list[Completion]:
        """All requests at once (so they share the servers' batches); results in input order.

        The first failure, or Ctrl-C, cancels every request still running and is raised at once: the
        servers stop generating answers nobody will read."""
        lock = threading.Lock()
        calls: list[grpc.Call] = []
        stopping = False

        def run(request: pb.GenerateRequest) -> Completion:
            with lock:
                # A queued request that starts after the others were cancelled would run unwatched.
                if stopping:
                    raise CancelledError()
                call = self.stub.Generate(request, timeout=timeout)
                calls.append(call)
            return _collect(call)

        ex = ThreadPoolExecutor(max_workers=max(1, min(64, len(requests))))
        try:
            futures = [ex.submit(run, r) for r in requests]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f in done and f.exception() is not None:
                    f.result()  # raises it, while later requests may still be running
            return [f.result() for f in futures]
        except BaseException:
            with lock:
                stopping = True
                for call in calls:
                    call.cancel()
            raise
        finally:
            # `with ThreadPoolExecutor` would wait here for every request to run to its end.
            ex.shutdown(wait=False, cancel_futures=True)


def _collect(responses: Iterable[pb.GenerateResponse]) -> Completion:
    c = Completion()
    for msg in responses:
        c.prompt_token_ids.extend(msg.prompt_token_ids)
        c.token_ids.extend(msg.token_ids)
        c.logprobs.extend(msg.logprobs)
        c.top_logprobs.extend(top_logprobs_from_pb(t) for t in msg.top_logprobs)
        if msg.HasField("prompt_logprobs"):
            c.prompt_logprobs, top = prompt_logprobs_from_pb(msg.prompt_logprobs)
            c.prompt_top_logprobs = top if msg.prompt_logprobs.top_logprobs else None
        c.text += msg.text
        if msg.finish_reason:
            c.finish_reason = FINISH_FROM_PB[msg.finish_reason]
            c.stop_reason = msg.stop_reason
            c.usage = {
                "prompt_tokens": msg.usage.prompt_tokens,
                "completion_tokens": msg.usage.completion_tokens,
                "cached_prompt_tokens": msg.usage.cached_prompt_tokens,
            }
            c.timings = {
                "queue": msg.timings.queue_seconds,
                "ttft": msg.timings.ttft_seconds,
                "e2e": msg.timings.e2e_seconds,
            }
    return c
