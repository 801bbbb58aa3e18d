"""Running the operator: `tandem operator` as a process (liveness, SIGTERM), --all-namespaces, peering."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import subprocess
import sys

import aiohttp

from tandem_operator import api
from tandem_worker.server.local import free_port

from .conftest import NAMESPACE, Cluster, RunningOperator, eventually, load_example

PEERING = "tandem-operator"


async def test_tandem_operator_command_serves_liveness_and_reconciles(cluster: Cluster):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem_worker.cli", "operator", "--namespace", NAMESPACE, "--standalone",
         "--liveness", f"http://127.0.0.1:{port}/healthz"],
        env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        healthy = {"ok": False}

        async def probe() -> None:
            async with aiohttp.ClientSession() as s:
                while not healthy["ok"]:
                    try:
                        async with s.get(f"http://127.0.0.1:{port}/healthz") as resp:
                            healthy["ok"] = resp.status == 200
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)

        await asyncio.wait_for(probe(), 30)
        await cluster.create_md(load_example("cpu-demo.yaml"))
        await eventually(lambda: cluster.get("Deployment", "smollm2-demo-router") is not None, timeout=20)
    finally:
        proc.send_signal(signal.SIGTERM)
        for _ in range(200):  # the test's loop must keep serving kmock while the operator stops
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        else:
            proc.kill()
        output = proc.communicate()[0]
    assert proc.returncode == 0, output


async def test_all_namespaces_and_peering_keep_a_standby_replica_passive(cluster: Cluster):
    # Another replica with a higher priority is alive: this one must not act.
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    await cluster.call(
        "POST",
        "/apis/kopf.dev/v1/clusterkopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING},
         "status": {"other-replica": {"priority": 1000, "lifetime": 60, "lastseen": now}}},
    )  # fmt: skip
    op = RunningOperator(
        argv=["--all-namespaces", "--peering", PEERING, "--priority", "10", "--liveness", ""]
    )
    await op.start()
    try:
        md = load_example("cpu-demo.yaml")
        md["metadata"]["namespace"] = "team-a"
        await cluster.create_md(md)
        await asyncio.sleep(2)
        assert cluster.children("team-a") == {}
        assert cluster.writes() == [] or all("kopfpeerings" in path for _, path, _ in cluster.writes())

        # The other replica goes away (its entry removed, as Kopf does on exit): this one takes over,
        # in any namespace.
        await cluster.call(
            "PATCH",
            f"/apis/kopf.dev/v1/clusterkopfpeerings/{PEERING}",
            {"status": {"other-replica": None}},
            "application/merge-patch+json",
        )
        await eventually(lambda: cluster.get("Deployment", "smollm2-demo-router", "team-a") is not None)
        owner = cluster.get("Deployment", "smollm2-demo-router", "team-a")["metadata"]["ownerReferences"][0]
        assert owner["kind"] == api.KIND
    finally:
        await op.stop()
