"""`python -m tandem_worker.fetch` (the init containers' downloads) against a local HTTP server whose
first answers break off mid-body: a download cut short is retried, never kept as the model, and a
failure to write the file is final rather than downloading it all again."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tandem_worker import fetch

BODY = b"GGUF" + bytes(range(256)) * 400  # ~100 KB: more than one read of a socket


def _cut_by_length(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(BODY)))
    handler.end_headers()
    handler.wfile.write(BODY[:1000])


def _cut_chunked(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    handler.wfile.write(b"%x\r\n%s\r\n" % (1000, BODY[:1000]))
    handler.wfile.write(b"%x\r\n%s" % (len(BODY) - 1000, BODY[1000:2000]))  # the rest never comes


def _whole(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(BODY)))
    handler.end_headers()
    handler.wfile.write(BODY)


Answer = Callable[[http.server.BaseHTTPRequestHandler], None]


@pytest.fixture
def serve() -> Iterator[Callable[[list[Answer]], tuple[str, list[str]]]]:
    """serve(answers): a server answering its n-th request with answers[n] (the last one after
    that), then dropping the connection; returns (the model's URL, the paths asked for)."""
    servers = []

    def start(answers: list[Answer]) -> tuple[str, list[str]]:
        asked: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                asked.append(self.path)
                answers[min(len(asked), len(answers)) - 1](self)
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

            def log_message(self, *args):
                pass

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/tiny.gguf", asked

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("cut", [_cut_by_length, _cut_chunked], ids=["content-length", "chunked"])
def test_a_download_cut_short_is_retried_not_kept(tmp_path: Path, serve, cut: Answer, monkeypatch):
    monkeypatch.setattr(fetch.time, "sleep", lambda s: None)  # the backoff between attempts
    url, asked = serve([cut, _whole])
    assert fetch.main(["model", url, str(tmp_path)]) == 0
    assert (tmp_path / "tiny.gguf").read_bytes() == BODY
    assert len(asked) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_a_server_that_always_cuts_fails_the_fetch(tmp_path: Path, serve, monkeypatch, capsys):
    """An init container that exits 1 with a message is restarted; one that exits 0 with a truncated
    model leaves the worker failing to load it, and every restart skips the download."""
    monkeypatch.setattr(fetch.time, "sleep", lambda s: None)
    url, asked = serve([_cut_by_length])
    assert fetch.main(["model", url, str(tmp_path)]) == 1
    assert "connection closed after 1000 of" in capsys.readouterr().err
    assert len(asked) == 1 + fetch.RETRIES
    assert list(tmp_path.iterdir()) == []  # no model, no temporary


@pytest.mark.parametrize("where", ["missing folder", "full volume"])
def test_a_write_error_is_final(tmp_path: Path, serve, monkeypatch, where: str):
    """Downloading a model again cannot make room for it: said at once, not after 1 + RETRIES full
    downloads and a minute of backoff."""
    if where == "full volume":
        dest = Path("/dev/full")  # every write fails with ENOSPC
        if not dest.exists():
            pytest.skip("needs /dev/full")
    else:
        dest = tmp_path / "missing" / "tiny.gguf"
    monkeypatch.setattr(fetch.time, "sleep", lambda s: None)
    url, asked = serve([_whole])
    with pytest.raises(fetch.FetchError) as failed:
        fetch.download(url, dest)
    assert len(asked) == 1
    assert "cannot write" in str(failed.value)


@pytest.mark.parametrize("what", ["model", "adapters"])
def test_a_malformed_uri_is_a_message_not_a_traceback(tmp_path: Path, what: str, capsys):
    uri = "http://[::1/tiny.gguf"  # urllib.parse raises ValueError on the unclosed bracket
    (tmp_path / "list").write_text(f"a {uri}\n")
    source = uri if what == "model" else str(tmp_path / "list")
    assert fetch.main([what, source, str(tmp_path)]) == 1
    assert "not a URI" in capsys.readouterr().err
