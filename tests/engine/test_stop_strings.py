"""Stop strings over real SmolLM2 token ids: special tokens named by their text, token boundaries,
the start of the output, and text held back until a stop string is decided."""

from __future__ import annotations

import pytest

from tandem_worker.engine.sampling_params import SamplingParams
from tandem_worker.engine.tokenizer import TextStream, Tokenizer
from tests import detokenizers

from .conftest import run_all

# Fixtures by assignment, not import: a test's `tok` argument would shadow an imported name.
real_tok = detokenizers.real_tok
tok = detokenizers.tok


def _stream(tok: Tokenizer, ids: list[int], stop: list[str]) -> tuple[str, TextStream, int]:
    """Push `ids` one at a time as the engine does; the text, the stream and how many ids it took.
    Every delta must extend the final text: nothing emitted is ever taken back."""
    stream = TextStream(tok, tok.encode("Say:"), SamplingParams(stop=stop))
    out, taken = "", 0
    for t in ids:
        out += stream.push([t], special=set())
        taken += 1
        if stream.stopped_by is not None:
            break
    final = out + stream.finish()
    assert final.startswith(out) and final == stream.text
    return final, stream, taken


def _chat_turn(tok: Tokenizer) -> list[int]:
    """An answer, its end of turn, and the start of the next turn, as a chat model writes them."""
    start, end = tok.hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    return [*tok.encode(" Done."), end, *tok.encode("\n"), start, *tok.encode("user\nmore")]


def test_a_stop_string_that_is_a_special_tokens_text_stops_at_that_token(tok):
    ids = _chat_turn(tok)
    end_at = ids.index(tok.hf.convert_tokens_to_ids("<|im_end|>"))
    text, stream, taken = _stream(tok, ids, ["<|im_end|>"])
    assert (text, stream.stopped_by, taken) == (" Done.", "<|im_end|>", end_at + 1)
    text, stream, taken = _stream(tok, ids, ["<|im_start|>"])
    assert (text, stream.stopped_by) == (" Done.\n", "<|im_start|>")
    # The router pushes a worker's tokens several at a time: those after the stop are not used.
    stream = TextStream(tok, tok.encode("Say:"), SamplingParams(stop=["<|im_end|>"]))
    assert stream.push(ids, special=set()) == " Done." and stream.used == end_at + 1


@pytest.mark.parametrize(
    "stop, cut",
    [
        (".<|im_end|>", " Done"),  # shown text, then the special token
        ("<|im_end|>\n<|im_start|>user", " Done."),  # special tokens with text between and after
        ("Done.\n", " "),  # shown text only: the hidden token between is not in the way
    ],
)
def test_stop_strings_mixing_special_tokens_and_text_never_leak(tok, stop, cut):
    text, stream, _ = _stream(tok, _chat_turn(tok), [stop, "<|endoftext|>"])
    assert (text, stream.stopped_by) == (cut, stop)


@pytest.mark.parametrize("stop", ["end|>", "<|im_", "|>\n<|"])
def test_a_stop_string_never_matches_part_of_a_special_tokens_text(tok, stop):
    # The token is one piece: only all of its text, as the client wrote it, names it.
    text, stream, _ = _stream(tok, _chat_turn(tok), [stop, "<|im_end|>x"])
    assert stream.stopped_by is None and text == " Done.\nuser\nmore"


def test_the_engine_stops_at_a_special_token_named_as_a_stop_string(engine):
    tok = engine.tokenizer
    prompt = tok.chat_prompt("Say hi.")
    end, start = tok.hf.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])

    def generate(**kw):
        params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, **kw)
        rid = engine.add_request(params=params, prompt_token_ids=prompt)
        return run_all(engine)[rid]

    # Past its end of turn (EOS, ignored here) the model opens the next turn: both tokens come.
    base = generate()
    assert end in base.token_ids and start in base.token_ids, base.token_ids
    for name, token in (("<|im_end|>", end), ("<|im_start|>", start)):
        n = base.token_ids.index(token) + 1
        out = generate(stop=[name])
        assert out.finish_reason == "stop" and out.stop_reason == name
        assert out.token_ids == base.token_ids[:n]
        assert out.text == tok.decode(base.token_ids[:n])


def test_the_engine_reports_a_stop_the_text_completes_only_at_its_end(engine):
    # Each emoji after the first few is one token holding a space and the emoji's first bytes:
    # the space is held back until the emoji is whole. Cut there (max_tokens), "🎏 " is completed
    # only as the text ends: a stop, not a length (the text was already cut right, the reason not).
    params = SamplingParams(max_tokens=22, temperature=0.0, ignore_eos=True, stop=["🎏 "])
    rid = engine.add_request(params=params, prompt="Emoji list: 🎉 🎈 🎁 🎂")
    out = run_all(engine)[rid]
    assert out.text.endswith(" 🎎 ") and "🎏" not in out.text
    assert (out.finish_reason, out.stop_reason) == ("stop", "🎏 ")


SPLIT_TEXT = " one two three STOP four 東京 🚀 naïve"


@pytest.mark.parametrize(
    "stop",
    [
        " one",  # the very start of the output
        " o",  # the start, ending inside the first token
        "ee ST",  # across a token boundary
        "STOP four",  # across several
        "東京",  # characters split over byte tokens
        "京 🚀 n",
        "ïve",  # the output's last characters
    ],
)
def test_stop_strings_anywhere_in_the_output_cut_it_and_never_leak(tok, stop):
    ids = tok.encode(SPLIT_TEXT)
    whole = tok.decode(ids)
    text, stream, _ = _stream(tok, ids, [stop])
    assert stream.stopped_by == stop and text == whole[: whole.index(stop)]


def test_a_stop_string_completed_by_an_output_cut_inside_a_character_still_cuts_the_text(tok):
    # " 東" is one token of a space and the character's first bytes, so the detokenizer holds the
    # space back until the character is whole. max_tokens ending before then flushes " \ufffd":
    # the text ended up holding the stop string "! ".
    ids = tok.encode("Hello, world! 東京")
    cut = next(k for k in range(1, len(ids)) if tok.hf.decode(ids[:k]).endswith("! \ufffd"))
    stream = TextStream(tok, tok.encode("Say:"), SamplingParams(stop=["! "]))
    text = "".join(stream.push([t], special=set()) for t in ids[:cut]) + stream.finish()
    assert (text, stream.stopped_by) == ("Hello, world", "! ")


@pytest.mark.parametrize("named", [False, True])
def test_with_min_tokens_a_stop_string_counts_only_if_it_ends_past_them(tok, named):
    # vLLM's output processor: no stop string is looked for in the first min_tokens tokens' text; one
    # that ends later counts, also when it starts inside that text.
    words = [tok.encode(w)[0] for w in (" a", ",", " b", ",", " c", ",", " d")]
    assert len(words) == 7 and tok.decode(words) == " a, b, c, d"
    end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    extra = ["<|im_end|>"] if named else []  # a hidden token named by a stop string: the other path

    def run(min_tokens: int, stop: list[str]) -> tuple[str, str | None, int]:
        stream = TextStream(
            tok, tok.encode("Say:"), SamplingParams(stop=stop + extra, max_tokens=9, min_tokens=min_tokens)
        )
        out, taken = "", 0
        for t in [*words, end]:
            out += stream.push([t], special=set())
            taken += 1
            if stream.stopped_by is not None:
                break
        return out + stream.finish(), stream.stopped_by, taken

    assert run(0, [","]) == (" a", ",", 2)
    assert run(2, [","]) == (" a, b", ",", 4)  # the first "," is the 2nd token: within min_tokens
    assert run(3, [","]) == (" a, b", ",", 4)
    assert run(4, [","]) == (" a, b, c", ",", 6)
    assert run(4, [", c"]) == (" a, b", ", c", 5)  # starts in the first 4 tokens, ends in the 5th
    # Ending in the 5th token is within min_tokens 5: the text runs on, to the named special token.
    assert run(5, [", c"]) == (" a, b, c, d", "<|im_end|>" if named else None, 8)
