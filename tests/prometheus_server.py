"""Debian's Prometheus server on loopback, for the tests that check queries against real scrapes."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tandem_worker.server.local import free_port

PROMETHEUS = shutil.which("prometheus")  # `make install` fetches Debian's package when it can


@contextlib.contextmanager
def prometheus_server(folder: Path, config: dict[str, Any] | str) -> Iterator[str]:
    """Prometheus with `config` (a dict, written as JSON, which is YAML too; or YAML text) and its
    data under `folder`; yields its base URL once it answers /-/ready, and stops it after."""
    assert PROMETHEUS is not None, "callers skip without Debian's prometheus package"
    path = folder / "prometheus.yml"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (folder / "prometheus.log").open("w") as log:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={folder / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if urllib.request.urlopen(f"{url}/-/ready", timeout=1).status == 200:
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Prometheus did not start; see {folder / 'prometheus.log'}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
