"""Generate `tandem_proto` from the .proto sources; `--check` fails if the committed code is stale.

Sources live in proto/tandem/v1/*.proto (package tandem.v1). protoc writes `from tandem.v1 import`
for cross-file imports; we rewrite that to `from tandem_proto.v1 import` so the generated modules
import as `tandem_proto.v1.inference_pb2` without putting a bare `tandem` package on sys.path.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "tandem" / "v1"
PACKAGE = HERE / "src" / "tandem_proto"
# protoc's cross-file import, at the start of a line, in *_pb2.py, *_pb2.pyi and *_pb2_grpc.py.
_IMPORT = re.compile(r"^from tandem\.v1 import ", re.MULTILINE)
_PKG_INIT = '"""Tandem\'s wire contracts: `from tandem_proto.v1 import inference_pb2`."""\n'
_V1_INIT = '"""Generated from proto/tandem/v1 by proto/generate.py; do not edit."""\n'


def _write(path: Path, text: str) -> None:
    # Fixed encoding and line endings, so output is byte-identical on every platform.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(HERE.parent))
    except ValueError:
        return str(path)


def generate(out_pkg: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(SOURCES.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{HERE}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p.relative_to(HERE)) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        target = out_pkg / "v1"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        written = []
        for f in sorted((Path(tmp) / "tandem" / "v1").iterdir()):
            text = _IMPORT.sub("from tandem_proto.v1 import ", f.read_text(encoding="utf-8"))
            _write(target / f.name, text)
            written.append(target / f.name)
        _write(target / "__init__.py", _V1_INIT)
    _write(out_pkg / "__init__.py", _PKG_INIT)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed code instead of writing")
    ap.add_argument("--out", type=Path, default=PACKAGE, help="package folder (default: %(default)s)")
    args = ap.parse_args()
    if not args.check:
        generate(args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "tandem_proto"
        generate(fresh)
        stale = []
        for f in sorted(fresh.rglob("*")):
            if f.is_file():
                committed = args.out / f.relative_to(fresh)
                if not committed.is_file() or not filecmp.cmp(f, committed, shallow=False):
                    stale.append(_shown(committed))
        extra = [
            _shown(p)
            for p in sorted((args.out / "v1").glob("*"))
            if p.is_file() and not (fresh / "v1" / p.name).exists()
        ]
        if stale or extra:
            print("generated code is stale; run `make proto`:", *stale, *extra, sep="\n  ", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
