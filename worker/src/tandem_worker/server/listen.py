"""Listening sockets for Tandem's gRPC servers: exclusive ports, and a clear error when taken."""

from __future__ import annotations

import grpc

# gRPC Python sets SO_REUSEPORT by default: a second router or worker on a port already in use
# then "listens" too, and the kernel splits new connections between the two processes (a health
# check may be answered by the other one). Off, the second one fails to start, as it should.
EXCLUSIVE_PORT_OPTIONS = [("grpc.so_reuseport", 0)]


def listen(server: grpc.Server, host: str, port: int, what: str = "gRPC") -> int:
    """Bind `server` to host:port (a server made with EXCLUSIVE_PORT_OPTIONS); returns the port.
    Raises OSError naming the address when it cannot (gRPC raises a RuntimeError that does not)."""
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(
            f"cannot listen for {what} on {host}:{port}: the address is in use or not available here"
        )
    return bound
