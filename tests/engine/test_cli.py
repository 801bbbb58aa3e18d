"""`tandem generate` as a user runs it: a real process, real model, JSON out, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tandem_worker.engine.sampling_params import SamplingParams

from .conftest import run_all


def tandem(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandem_worker.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_generate_json_in_input_order_matches_engine(engine, model_dir, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(
        json.dumps({"prompt": "Three facts about Mars:", "max_tokens": 5, "top_logprobs": 2})
        + "\n\n"
        + json.dumps({"prompt": "What is 2+2?", "chat": True, "max_tokens": 7})
        + "\n"
    )
    r = tandem(
        "generate",
        "--model",
        str(model_dir),
        "--json",
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--prompt",
        "Héllo wörld, the weather is",
        "--prompts-file",
        str(prompts_file),
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == [
        "Héllo wörld, the weather is",
        "Three facts about Mars:",
        "What is 2+2?",
    ]
    assert [len(x["token_ids"]) for x in lines[:2]] == [6, 5]
    # Asked for per prompt: each position's two most likely, greedy's choice first.
    top = lines[1]["top_logprobs"]
    assert len(top) == 5 and all(len(pairs) == 2 for pairs in top)
    assert [pairs[0][0] for pairs in top] == lines[1]["token_ids"]
    assert [pairs[0][1] for pairs in top] == pytest.approx(lines[1]["logprobs"])
    assert "top_logprobs" not in lines[0]
    for x in lines:
        assert set(x) >= {"prompt_token_ids", "token_ids", "text", "finish_reason"}
    assert lines[2]["prompt_token_ids"] == engine.tokenizer.chat_prompt("What is 2+2?")
    # The process's greedy tokens equal the in-process engine's.
    rid = engine.add_request(
        prompt_token_ids=lines[0]["prompt_token_ids"],
        params=SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
    )
    out = run_all(engine)[rid]
    assert out.token_ids == lines[0]["token_ids"] and out.text == lines[0]["text"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--prompt", "hi", "--max-tokens", "0"], "max_tokens"),
        (["--prompt", "hi", "--top-p", "1.5"], "top_p"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["--prompt", "hi", "--top-logprobs", "21"], "top_logprobs"),
        (["--prompt", ""], "prompt"),
        ([], "--prompt"),
        (["--prompt", "hi", "--model", "no-such-model"], "no-such-model"),
        (["--prompt", "hi", "--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
        (["--prompts-file", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
    ],
)
def test_bad_input_exits_nonzero_with_a_message_and_no_traceback(args, needle):
    r = tandem("generate", *args, timeout=120)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
