"""`tandem up` as a user runs it: serve, answer `tandem generate --endpoint`, stop cleanly on SIGTERM."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading

import psutil
import pytest

from .conftest import offline_generate
from .procs import KV_BYTES, free_port, greedy, spawn, tandem_argv

pytestmark = pytest.mark.slow  # real processes: seconds to minutes


def test_tandem_up_serves_and_stops_cleanly(offline, model_dir, tmp_path):
    port = free_port()
    up = spawn(
        tandem_argv(
            "up",
            "--prefill",
            "1",
            "--decode",
            "1",
            "--port",
            str(port),
            "--kv-cache-bytes",
            str(KV_BYTES),
            "--log-dir",
            str(tmp_path / "logs"),
        ),
        None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in up.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    children: list[psutil.Process] = []
    output: list[str] = []
    try:
        while True:
            line = lines.get(timeout=240)
            assert line is not None, "tandem up exited before serving:\n" + "".join(output)
            output.append(line)
            if "serving" in line:
                break
        assert f"127.0.0.1:{port}" in line
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) == 3, children  # prefill, decode, router

        prompt = "Héllo wörld, the weather today is"
        gen = subprocess.run(
            tandem_argv(
                "generate",
                "--endpoint",
                f"127.0.0.1:{port}",
                "--json",
                "--prompt",
                prompt,
                "--max-tokens",
                "8",
                "--ignore-eos",
                "--timeout",
                "120",
            ),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert gen.returncode == 0, gen.stderr
        (record,) = [json.loads(x) for x in gen.stdout.splitlines()]
        (ref,) = offline_generate(offline, [prompt], greedy(8))
        assert record["prompt"] == prompt
        assert record["prompt_token_ids"] == ref.prompt_token_ids
        assert record["token_ids"] == ref.token_ids
        assert record["text"] == ref.text
        assert record["finish_reason"] == "length"

        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
        left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for c in children:  # never leave one behind, even when an assertion failed
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
    rest = "".join(output) + "".join(iter(lambda: lines.get(timeout=10) or "", ""))
    assert code == 0, rest
    assert "tandem up: stopped" in rest
    assert not left, f"children left running after tandem up exited: {left}"
