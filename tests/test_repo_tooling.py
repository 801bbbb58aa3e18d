"""What a newcomer runs first at the repository root: `make help`, and the README's commands that
write files there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_help_lists_every_target_in_one_column_with_readable_text():
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    names = [line.split()[0] for line in lines]
    assert {"help", "install", "test", "demo", "images", "images-cuda", "test-images"} <= set(names)
    # The help text starts in the same column on every line: the longest names pushed theirs over.
    starts = {len(line) - len(line[2 + len(name) :].lstrip()) for line, name in zip(lines, names)}
    assert len(starts) == 1, out.stdout
    assert all(line[2 + len(name)] == " " for line, name in zip(lines, names))
    assert "$(" not in out.stdout, out.stdout  # a make variable printed as written, not its value


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_the_readme_s_test_adapters_folder_is_ignored_by_git():
    # README: `benchmarks/make_adapters.py adapters` writes adapters/ at the repository root.
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, timeout=30).returncode == 0

    assert ignored("adapters/lora-0/adapter_model.safetensors")
    assert not ignored("worker/src/tandem_worker/engine/lora.py")
