"""Tandem's C++ CPU ops (csrc/), compiled on first use with torch's extension builder: the grouped
LoRA decode step, and a layer's small float32 ops (norm, rotary, KV write, SiLU-and-mul, paged
decode attention), which `tandem_kernels` dispatches CPU tensors to.

The build takes about 45 s on two cores and is cached (`$TANDEM_CACHE_DIR/torch_extensions`, next
to the converted models, else `~/.cache/tandem/torch_extensions`), per torch version and CPU
instruction set, and rebuilt when the source changes; `make install` builds it ahead
(`tandem-cpu-ops`).

An image has no compiler at run time, so its build stage builds the ops ahead for any CPU of its
architecture (`tandem-cpu-ops --portable DIR`: x86-64-v3, i.e. AVX2 and FMA, on x86_64; as fast
as a native build, the op being bound by memory) and points `TANDEM_CPU_OPS_DIR` at them; `load()`
takes that build as is when it was made for this torch, these sources and a CPU this one can run
it on, and says why not otherwise.

Without either (no compiler, no fitting prebuilt ops), or with `TANDEM_CPU_EXTENSION=0`, `load()`
returns None (with a warning where it could not build) and callers keep their pure-torch path: the
extension makes CPU serving faster, never possible.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(_CSRC / name for name in ("bindings.cpp", "lora_grouped_cpu.cpp", "decode_cpu.cpp"))
HEADERS = (_CSRC / "ops.h",)
ENV_SWITCH = "TANDEM_CPU_EXTENSION"
PREBUILT_ENV = "TANDEM_CPU_OPS_DIR"  # a folder `build_portable` wrote
_NAME = "tandem_cpu_ops"
_STAMP = "stamp.json"
# A portable build per architecture: its -march, and the CPU flags it needs at run time.
# x86-64-v3 (AVX2, FMA, BMI2, F16C; 2013 and later) keeps the op's inner loops vectorized.
PORTABLE = {
    "x86_64": ("x86-64-v3", ("avx2", "fma", "bmi2", "f16c", "movbe")),
    "aarch64": ("armv8-a", ()),
}
# -fopenmp: at::parallel_for is inlined from ATen's OpenMP header; without the flag its pragma is
# ignored and the op runs on one thread (measured: 2 threads took as long).
# -fno-trapping-math: lets the compiler turn float compares into selects (exp_fast's clamp), which a
# vectorized loop needs; nothing here reads floating-point exception flags.
# A prebuilt op's stamp records them: one built with other flags is not used.
CFLAGS = ("-O3", "-fopenmp", "-fno-trapping-math")
_UNSET = object()
_module: object = _UNSET


def _cpu_info() -> str:
    """The architecture, then the CPU's instruction-set flags as /proc/cpuinfo lists them."""
    info = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return info


def _cpu_key() -> str:
    """A short hash of the CPU's instruction set: a build for another CPU (a shared home) is not reused."""
    return hashlib.sha256(_cpu_info().encode()).hexdigest()[:12]


def source_hash() -> str:
    """What the ops are built from: a prebuilt op from other sources is not used."""
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    import torch

    root = os.environ.get("TANDEM_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "tandem"
    return base / "torch_extensions" / f"{_NAME}-torch{torch.__version__.replace('+', '_')}-{_cpu_key()}"


def available_compiler() -> str | None:
    """The C++ compiler torch's builder would use ($CXX, else c++), if it is installed."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _build(out: Path, march: str) -> ModuleType:
    out.mkdir(parents=True, exist_ok=True)
    # torch's builder guards the folder with a lock file that only its holder removes: after a
    # builder dies (a pod killed mid-build), every later one waits on it forever. An flock is
    # let go by the kernel when its process dies, so holding one, no live builder owns that file.
    with open(out / "tandem-build.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (out / "lock").unlink(missing_ok=True)
        return _load_or_compile(out, march)


def _load_or_compile(out: Path, march: str) -> ModuleType:
    from torch.utils import cpp_extension

    return cpp_extension.load(
        _NAME,
        [str(s) for s in SOURCES],
        extra_cflags=[*CFLAGS, f"-march={march}"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(out),
        verbose=False,
    )


def build_portable(out: Path) -> Path:
    """Build the ops for any CPU of this architecture into `out` (the .so and its stamp); the path
    of the .so. Needs a C++ compiler; the result does not."""
    import torch

    machine = platform.machine()
    if machine not in PORTABLE:
        raise RuntimeError(f"no portable build for {machine} (known: {', '.join(PORTABLE)})")
    march, needs = PORTABLE[machine]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # objects and ninja files stay behind
        built = Path(_build(Path(tmp), march).__file__)
        if built.name != f"{_NAME}.so":  # torch renames a second build in one process (_v1 ...)
            raise RuntimeError(f"built {built.name}: build the portable ops in a process of their own")
        so = out / built.name
        shutil.copyfile(built, so)
    stamp = {
        "torch": torch.__version__,
        "source": source_hash(),
        "machine": machine,
        "march": march,
        "flags": list(CFLAGS),
        "needs": list(needs),
    }
    (out / _STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    return so


def _load_prebuilt(folder: Path) -> ModuleType | None:
    """The ops `build_portable` left in `folder`, if they fit this torch, source and CPU."""
    import torch

    try:
        stamp = json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError) as e:
        log.warning("%s=%s holds no usable build (%s)", PREBUILT_ENV, folder, e)
        return None
    built_torch, built_machine = stamp.get("torch"), stamp.get("machine")
    missing = set(stamp.get("needs", [])) - set(_cpu_info().split())
    misfits = [
        (built_torch != torch.__version__, f"built for torch {built_torch}, this is {torch.__version__}"),
        (stamp.get("source") != source_hash(), "built from other sources"),
        (stamp.get("flags") != list(CFLAGS), f"built with other flags ({stamp.get('flags')})"),
        (built_machine != platform.machine(), f"built for {built_machine}, this is {platform.machine()}"),
        (bool(missing), f"this CPU lacks {', '.join(sorted(missing))}"),
    ]
    why = next((message for misfit, message in misfits if misfit), None)
    if why:
        log.warning("not using the prebuilt CPU ops in %s: %s", folder, why)
        return None
    spec = importlib.util.spec_from_file_location(_NAME, folder / f"{_NAME}.so")
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        log.warning("the prebuilt CPU ops in %s do not load (%s)", folder, e)
        return None
    return module


def loaded() -> ModuleType | None:
    """The ops if `load()` has already made them available in this process, else None: never
    builds (`tandem_kernels` asks this per call; the engine calls `load()` at start-up)."""
    return None if _module is _UNSET else _module  # type: ignore[return-value]


def load() -> ModuleType | None:
    """The compiled ops: prebuilt (`TANDEM_CPU_OPS_DIR`), else built here if needed; None (and one
    warning) where neither can be had."""
    global _module
    if _module is not _UNSET:
        return _module  # type: ignore[return-value]
    _module = None
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    prebuilt = os.environ.get(PREBUILT_ENV)
    if prebuilt:
        _module = _load_prebuilt(Path(prebuilt))
        if _module is not None:
            return _module  # type: ignore[return-value]
    if available_compiler() is None:
        log.warning("no C++ compiler: CPU steps use torch ops and the TorchScript LoRA loop (slower)")
        return None
    try:
        # -march=native: the build is used only on a CPU with the same flags (build_dir).
        _module = _build(build_dir(), "native")
    except Exception as e:  # noqa: BLE001 - any build failure leaves the pure-torch path
        log.warning(
            "building Tandem's CPU ops failed (%s): CPU steps use torch ops and the TorchScript LoRA loop", e
        )
        _module = None
    return _module  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """Build (or find) the ops for this CPU and say which (`make install` runs this); with
    `--portable DIR`, build them for any CPU of this architecture into DIR (an image's build)."""
    ap = argparse.ArgumentParser(prog="tandem-cpu-ops", description=main.__doc__)
    ap.add_argument("--portable", type=Path, metavar="DIR", help="build for any CPU of this architecture")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.portable:
        print(f"Tandem CPU ops, portable: {build_portable(args.portable)}")
        return
    mod = load()
    # Not an error without a compiler: serving works without the extension.
    print(f"Tandem CPU ops: {'built in ' + str(build_dir()) if mod else 'not available (see the warning)'}")
