"""`tandem up` restarts a worker whose engine watchdog says it is stuck, as a liveness probe does.

A hung CUDA call keeps a worker's process up and its port answering: the router takes it out of
rotation (its health turns NOT_SERVING), but nothing restarted it locally. The supervisor asks each
worker's `tandem.liveness` every LIVENESS_CHECK_S and kills one that says NOT_SERVING; its loop then
restarts it as one that died. Here the worker is a stand-in: a process (a sleeping Python) beside a health
server saying what a stuck or a healthy worker says.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tandem_worker.server import local
from tandem_worker.server.health import LIVENESS_SERVICE
from tandem_worker.server.local import Child, LocalDeployment

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _until(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.05)


def test_a_worker_whose_engine_is_stuck_is_killed_and_restarted(monkeypatch):
    server = grpc.server(ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set(LIVENESS_SERVICE, SERVING)
    checks: list[bool] = []

    def counted(address: str, timeout: float = 2.0) -> bool:
        checks.append(real_stuck(address, timeout))
        return checks[-1]

    real_stuck = local._stuck
    monkeypatch.setattr(local, "_stuck", counted)
    monkeypatch.setattr(local, "LIVENESS_CHECK_S", 0.0)
    deployment = LocalDeployment()
    worker = Child("decode-0", f"127.0.0.1:{port}", [sys.executable, "-c", "import time; time.sleep(600)"])
    deployment.children = [worker]
    spawned: list[subprocess.Popen] = []
    spawn = deployment._spawn

    def respawn(child: Child) -> None:
        spawn(child)
        spawned.append(child.proc)

    monkeypatch.setattr(deployment, "_spawn", respawn)
    deployment._spawn(worker)
    first = worker.proc
    stop = threading.Event()
    supervisor = threading.Thread(target=deployment.run_forever, args=(stop,))
    supervisor.start()
    try:
        # Alive (and draining or waiting workers say so too): asked, and left alone.
        _until(lambda: len(checks) >= 3)
        assert first.poll() is None and spawned == [first] and not any(checks)
        servicer.set(LIVENESS_SERVICE, NOT_SERVING)  # its watchdog found the engine stuck
        _until(lambda: len(spawned) == 2)
        assert first.returncode == -9  # killed, as the kubelet would (a hung CUDA call ignores SIGTERM)
        assert spawned[1].poll() is None and len(worker.restarts) == 1
    finally:
        stop.set()
        supervisor.join(10)
        for proc in spawned:
            proc.kill()
            proc.wait()
        server.stop(None)
