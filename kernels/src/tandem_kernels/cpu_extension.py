"""Tandem's C++ CPU ops (csrc/), compiled on first use with torch's extension builder.

The build takes about 25 s on two cores and is cached (`$TANDEM_CACHE_DIR/torch_extensions`, next
to the converted models, else `~/.cache/tandem/torch_extensions`), per torch version and CPU
instruction set, and rebuilt when the source changes; `make install` builds it ahead (`main`).
Without a C++ compiler, or with `TANDEM_CPU_EXTENSION=0`, `load()` returns None (with a warning
where it could not build) and callers keep their pure-torch path: the extension makes CPU serving
faster, never possible.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCES = (Path(__file__).parent / "csrc" / "lora_grouped_cpu.cpp",)
ENV_SWITCH = "TANDEM_CPU_EXTENSION"
_NAME = "tandem_cpu_ops"
_UNSET = object()
_module: object = _UNSET


def _cpu_key() -> str:
    """A short hash of the CPU's instruction set: a build for another CPU (a shared home) is not reused."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def build_dir() -> Path:
    import torch

    root = os.environ.get("TANDEM_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "tandem"
    return base / "torch_extensions" / f"{_NAME}-torch{torch.__version__.replace('+', '_')}-{_cpu_key()}"


def available_compiler() -> str | None:
    """The C++ compiler torch's builder would use ($CXX, else c++), if it is installed."""
    return shutil.which(os.environ.get("CXX", "c++"))


def load() -> ModuleType | None:
    """The compiled ops, building them if needed; None (and one warning) where they cannot be."""
    global _module
    if _module is not _UNSET:
        return _module  # type: ignore[return-value]
    _module = None
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if available_compiler() is None:
        log.warning("no C++ compiler: the CPU LoRA step uses its TorchScript loop (slower)")
        return None
    try:
        from torch.utils import cpp_extension

        out = build_dir()
        out.mkdir(parents=True, exist_ok=True)
        _module = cpp_extension.load(
            _NAME,
            [str(s) for s in SOURCES],
            # -march=native: the build is used only on a CPU with the same flags (build_dir).
            # -fopenmp: at::parallel_for is inlined from ATen's OpenMP header; without the flag its
            # pragma is ignored and the op runs on one thread (measured: 2 threads took as long).
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(out),
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any build failure leaves the pure-torch path
        log.warning("building Tandem's CPU ops failed (%s): the CPU LoRA step uses its TorchScript loop", e)
        _module = None
    return _module  # type: ignore[return-value]


def main() -> None:
    """Build (or find) the ops and say which (`make install` runs this)."""
    logging.basicConfig(level=logging.INFO)
    mod = load()
    # Not an error without a compiler: serving works without the extension.
    print(f"Tandem CPU ops: {'built in ' + str(build_dir()) if mod else 'not available (see the warning)'}")
