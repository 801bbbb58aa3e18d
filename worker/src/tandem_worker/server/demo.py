"""`tandem demo`: start a local disaggregated deployment, stream a few answers through it, stop it."""

from __future__ import annotations

import time

from ..engine.sampling_params import SamplingParams
from .client import Client, build_request
from .local import LocalDeployment, free_port

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about GPUs.",
    "Explain in one sentence why a KV cache speeds up text generation.",
]


def demo(model: str = "smollm2-135m", max_tokens: int = 64) -> int:
    # Built first: a bad value fails here, not after the deployment took a minute to start.
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    dep = LocalDeployment(prefill=1, decode=1, port=free_port(), model=model, kv_cache_bytes=512 << 20)
    print(
        "Starting a local disaggregated deployment: 1 prefill worker, 1 decode worker, 1 router ...",
        flush=True,
    )
    t0 = time.monotonic()
    dep.start()
    try:
        print(f"Serving {model} on {dep.endpoint} (ready in {time.monotonic() - t0:.0f}s).\n", flush=True)
        with Client(dep.endpoint) as client:
            for q in QUESTIONS:
                print(f"> {q}\n", flush=True)
                last = None
                for msg in client.stream(build_request(q, params, chat=True)):
                    print(msg.text, end="", flush=True)
                    last = msg
                if last is not None:
                    print(
                        f"\n\n[{last.usage.completion_tokens} tokens, first token after "
                        f"{last.timings.ttft_seconds * 1000:.0f} ms, "
                        f"{last.timings.e2e_seconds:.1f} s in all]\n",
                        flush=True,
                    )
    finally:
        dep.stop()
    print("Stopped the deployment. Run `tandem up` to keep one running.", flush=True)
    return 0
