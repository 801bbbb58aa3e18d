"""`python -m tandem_worker.fetch`: the init containers' downloads of a model and of URI adapters.

They run in the deployment's own image (already on the node for the main container, with a numeric
non-root USER), so a cluster mirrors one image and runs under `runAsNonRoot`. Standard library only:
starting it costs no torch import.

- `model URI DIR`: a `.gguf` file is saved as `DIR/<its name>`; a `.tar`, `.tar.gz` or `.tgz` archive
  is unpacked into `DIR/model` (where the operator's `--model` points).
- `adapters LIST DIR`: each `NAME URI` line of LIST (the ConfigMap's `adapter-uris.txt`) is a tar
  archive unpacked into `DIR/NAME`.

Each download goes to a temporary name and is moved into place only when complete, so an init
container restarted mid-download starts that item again, and skips what an earlier run finished.
Archives are unpacked with tarfile's "data" filter: no member may land outside its folder, be a
device, or be a link pointing out.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
RETRIES = 5
CHUNK_BYTES = 1 << 20


class FetchError(Exception):
    """A download or unpack that cannot succeed: a bad name or URI, a refused request, a bad archive."""


def file_name(uri: str) -> str:
    """The last path segment of a URI as written (percent-escapes kept, as the operator's `--model`
    names it): what a `.gguf` model is saved as."""
    return urllib.parse.urlparse(uri).path.rsplit("/", 1)[-1]


def _check_uri(uri: str) -> None:
    try:
        scheme = urllib.parse.urlparse(uri).scheme
    except ValueError as e:  # e.g. an unclosed "[" of an IPv6 host
        raise FetchError(f"not a URI: {uri!r} ({e})") from None
    if scheme not in ("http", "https"):
        raise FetchError(f"not an http(s) URI: {uri!r}")


class _Transient(Exception):
    """A failure that another attempt may avoid: a refused or dropped connection, a 5xx or 429."""


def _body(answer: http.client.HTTPResponse) -> Iterator[bytes]:
    """The answer's body in chunks. A connection that ends early is an error: read in chunks,
    http.client ends a body cut short as if it were complete (and a cut chunked one raises
    IncompleteRead, which is no OSError)."""
    received = 0
    while True:
        try:
            chunk = answer.read(CHUNK_BYTES)
        except (OSError, http.client.HTTPException) as e:
            raise _Transient(f"connection lost after {received} bytes ({e!r})") from None
        if not chunk:
            break
        received += len(chunk)
        yield chunk
    length = answer.headers.get("Content-Length", "")
    if length.isdigit() and received != int(length):
        raise _Transient(f"connection closed after {received} of {length} bytes")


def _download_once(uri: str, dest: Path) -> None:
    try:
        answer = urllib.request.urlopen(uri, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code < 500 and e.code != 429:
            raise FetchError(f"{uri}: HTTP {e.code} {e.reason}") from None
        raise _Transient(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Transient(str(getattr(e, "reason", e))) from None
    with answer:
        try:
            with open(dest, "wb") as out:
                for chunk in _body(answer):
                    out.write(chunk)
        except OSError as e:
            # Ours, not the network's (a full volume, a missing folder): downloading it all again
            # cannot help.
            raise FetchError(f"{uri}: cannot write {dest}: {e.strerror or e}") from None


def download(uri: str, dest: Path, retries: int = RETRIES, delay: float = 2.0) -> None:
    """`uri` into `dest`, retrying connection errors (also one cut short) and 5xx/429 answers;
    4xx and errors writing `dest` are final."""
    _check_uri(uri)
    for attempt in range(retries + 1):
        try:
            _download_once(uri, dest)
            return
        except _Transient as e:
            if attempt == retries:
                raise FetchError(f"{uri}: {e}") from None
            print(f"fetch: {uri}: {e}; retrying ({attempt + 1}/{retries})", file=sys.stderr)
        time.sleep(delay * 2**attempt)


def _unpack(archive: Path, into: Path) -> None:
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:  # any compression tarfile knows
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise FetchError(f"{archive.name}: not a usable tar archive: {e}") from None


def fetch_archive(uri: str, target: Path) -> bool:
    """Unpack the tar archive at `uri` into the folder `target`; False when it is already there."""
    if target.is_dir():
        return False
    downloaded, unpacking = target.parent / ".download", target.parent / ".unpack"
    try:
        download(uri, downloaded)
        _unpack(downloaded, unpacking)
        unpacking.rename(target)
    finally:
        downloaded.unlink(missing_ok=True)
        shutil.rmtree(unpacking, ignore_errors=True)
    return True


def fetch_model(uri: str, directory: Path) -> Path:
    """The model at `uri` in `directory`: a `.gguf` file under its name, an archive as `model/`."""
    _check_uri(uri)
    name = file_name(uri)
    if name.endswith(ARCHIVE_SUFFIXES):
        fetch_archive(uri, directory / "model")
        return directory / "model"
    if not name.endswith(".gguf") or name.startswith("."):
        raise FetchError(f"a model URI names a .gguf file or a .tar/.tar.gz/.tgz archive, not {name!r}")
    target = directory / name
    if not target.is_file():
        try:
            download(uri, directory / ".download")
            os.replace(directory / ".download", target)
        finally:
            (directory / ".download").unlink(missing_ok=True)
    return target


def parse_adapter_list(text: str) -> list[tuple[str, str]]:
    """(name, URI) per non-empty line; refuses a name that is not one folder, or a URI not http(s)."""
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise FetchError(f"line {number}: expected 'NAME URI', got {line!r}")
        name, uri = fields
        if name.startswith((".", "-")) or "/" in name:
            raise FetchError(f"line {number}: bad adapter name {name!r}")
        _check_uri(uri)
        pairs.append((name, uri))
    return pairs


def fetch_adapters(list_path: Path, directory: Path) -> list[str]:
    """Every adapter of the list unpacked into `directory/NAME`; returns the names fetched now."""
    pairs = parse_adapter_list(list_path.read_text())  # all checked before anything is fetched
    return [name for name, uri in pairs if fetch_archive(uri, directory / name)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem_worker.fetch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    model = sub.add_parser("model", help="download a model (.gguf, or a tar archive of a model folder)")
    model.add_argument("uri")
    model.add_argument("dir", type=Path)
    adapters = sub.add_parser("adapters", help="download the adapters of a 'NAME URI' list")
    adapters.add_argument("list", type=Path)
    adapters.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.what == "model":
            print(f"fetch: model at {fetch_model(args.uri, args.dir)}", file=sys.stderr)
        else:
            fetched = fetch_adapters(args.list, args.dir)
            print(f"fetch: {len(fetched)} adapter(s) fetched: {' '.join(fetched)}", file=sys.stderr)
    except FetchError as e:
        print(f"fetch: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
