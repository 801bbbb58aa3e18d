"""The tokenizer fixtures of the text-stream tests (router and engine): a test module takes them as
`real_tok = detokenizers.real_tok` and `tok = detokenizers.tok`."""

from __future__ import annotations

import pytest

from tandem_worker.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def real_tok(model_dir) -> Tokenizer:
    return Tokenizer(model_dir)


@pytest.fixture(params=["decode_stream", "window"])
def tok(request, real_tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> Tokenizer:
    """Both detokenizers: the Rust DecodeStream, and the window a tokenizer without one gets."""
    if request.param == "window":
        monkeypatch.setattr(Tokenizer, "backend", property(lambda self: None))
    return real_tok
