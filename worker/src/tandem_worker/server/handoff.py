"""Requests the router's own frontends (OpenAI HTTP, KServe) hand to its gRPC endpoint.

The router counts every request's outcome in `tandem_requests_total`, when its handler runs. A
forwarded request whose client ended it (its deadline, a cancellation) before that handler began
never reaches it: gRPC's client gives up before sending, or its server drops a call cancelled while
it waited for a handler thread, without ever calling the handler. Such a request was counted
nowhere (a KServe `timeout` of 1 µs did so now and then). Each forwarded call therefore carries a
token in its metadata; when the call has ended, the frontend settles the token: if the router's
handler began, the router counts the request; if not, the frontend has it counted now, and a
handler that begins later for that token answers without counting it. Exactly once either way,
whatever the order, under one lock.

Direct gRPC clients of the router are not covered: a call of theirs that gRPC drops before its
handler runs is still counted nowhere (nothing in the process hears of it).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

METADATA_KEY = "tandem-handoff"

# A token the frontend counted whose call never reached the router is forgotten after this: a call
# that arrives later still would be counted twice, but gRPC's client and server give up on a call
# past its deadline in far less.
FORGET_AFTER_SECONDS = 300.0
# And past this many (a flood of calls dropped under overload), the oldest first: about 10 MB.
MAX_SETTLED = 100_000


@dataclass(frozen=True)
class Handoff:
    """One forwarded call: its token, and when the frontend took the request (its arrival)."""

    token: str
    arrival: float

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((METADATA_KEY, self.token),)


class Handoffs:
    """`count(arrival, code)` counts a request whose router handler never began, the call having
    ended with `code` (never OK); it runs outside the lock."""

    def __init__(
        self, count: Callable[[float, grpc.StatusCode], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._count = count
        self.clock = clock
        self._lock = threading.Lock()
        self._begun: set[str] = set()
        self._settled: OrderedDict[str, float] = OrderedDict()  # counted by the frontend: when

    def new(self) -> Handoff:
        return Handoff(uuid.uuid4().hex, self.clock())

    def begin(self, context: grpc.ServicerContext) -> bool:
        """The router's handler, first thing: False when the frontend already counted this request
        (the handler must then answer without counting it). True for calls from anyone else."""
        token = next((v for k, v in context.invocation_metadata() or () if k == METADATA_KEY), None)
        if token is None:
            return True
        with self._lock:
            if self._settled.pop(token, None) is not None:
                return False
            self._begun.add(token)
            return True

    def settle(self, handoff: Handoff, code: grpc.StatusCode) -> None:
        """The frontend, once its call has ended with `code`."""
        now = self.clock()
        with self._lock:
            if handoff.token in self._begun:
                self._begun.discard(handoff.token)
                return
            if code == grpc.StatusCode.OK:  # answered by a server that is not a router: not ours
                return
            self._settled[handoff.token] = now
            while self._settled and (
                len(self._settled) > MAX_SETTLED
                or next(iter(self._settled.values())) < now - FORGET_AFTER_SECONDS
            ):
                self._settled.popitem(last=False)
        self._count(handoff.arrival, code)

    def pending(self) -> int:
        """Tokens held (begun and not yet settled, or settled and not yet begun): for tests."""
        with self._lock:
            return len(self._begun) + len(self._settled)


def forward(
    stub: Any, request: Any, timeout: float | None, handoffs: Handoffs | None
) -> tuple[grpc.Call, Callable[[], None]]:
    """Start `stub.Generate(request)` for a frontend; returns the call and what to run once done
    with it (in a `finally`): it cancels the call if still running and, with `handoffs`, settles it."""
    handoff = handoffs.new() if handoffs is not None else None
    call = stub.Generate(request, timeout=timeout, metadata=handoff.metadata if handoff else None)

    def done() -> None:
        if call.is_active():
            call.cancel()  # no longer read
        if handoff is not None:
            handoffs.settle(handoff, call.code())

    return call, done
