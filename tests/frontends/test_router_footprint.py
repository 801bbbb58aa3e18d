"""The router runs no model: it serves every frontend without importing torch."""

from __future__ import annotations

import sys

import openai
import pytest
import tritonclient.grpc as tc

from tests.frontends.conftest import SERVED
from tests.frontends.test_kserve import GREEDY as KSERVE_GREEDY
from tests.frontends.test_kserve import sampling, text_input, text_of
from tests.serving.procs import generate, greedy, request

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/maps")


def maps_torch(pid: int) -> bool:
    """Whether the process has torch's C++ library mapped: torch was imported, by whatever."""
    with open(f"/proc/{pid}/maps") as f:
        return any("libtorch" in line for line in f)


def test_the_router_serves_every_frontend_without_torch(deployment):
    # The router tokenizes, applies the chat template, detokenizes and routes. Importing torch (by
    # transformers' AutoTokenizer, or the engine's modules) cost each router 260 MiB and 1.4 s of
    # every start, more from a cold image. A worker maps torch, so the check can tell.
    assert maps_torch(deployment.d0.pid)
    chat = [{"role": "user", "content": "Name three colours."}]
    prompt = "The capital of France is"
    grpc_chat = generate(deployment.router, request(chat, greedy(16)))
    grpc_text = generate(deployment.router, request(prompt, greedy(16)))
    with openai.OpenAI(base_url=deployment.http + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        greedy_chat = {"max_completion_tokens": 16, "temperature": 0.0, "extra_body": {"ignore_eos": True}}
        r = c.chat.completions.create(model=SERVED, messages=chat, **greedy_chat)
    assert r.choices[0].message.content == grpc_chat.text and grpc_chat.text
    kserve = tc.InferenceServerClient(deployment.kserve)
    try:
        answer = kserve.infer(SERVED, [text_input(prompt), sampling(**KSERVE_GREEDY)])
        assert text_of(answer) == grpc_text.text
    finally:
        kserve.close()
    assert not maps_torch(deployment.router.pid)
