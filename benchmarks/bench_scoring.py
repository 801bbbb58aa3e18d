"""Scoring prompts (each token's log-probability given those before it) against `transformers`.

What an evaluation harness asks for in bulk (lm-evaluation-harness's loglikelihood tasks: `echo`
with `logprobs`): Tandem's engine with `prompt_logprobs=0` and one generated token, against
`transformers`' forward over the same prompts, padded in batches, with `log_softmax` and a gather:
what the harness's own Hugging Face backend does. Side by side in one process, on the same
prompts; reported are prompt tokens scored per second, the ratio, and the largest difference
between the two sides' log-probabilities.

Run: make bench   (or: python benchmarks/bench_scoring.py [--prompts 32] [--batch 8])
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import AutoModelForCausalLM

from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.sampling_params import SamplingParams

WORDS = "the a river town kept lanterns along its quay and every evening keeper counted them twice".split()


def prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 64 to 512 tokens of plain text."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(600)))
        out.append(ids[: rng.randint(64, 512)])
    return out


def tandem_scores(engine: LLMEngine, batch: list[list[int]]) -> list[list[float]]:
    ids = [
        engine.add_request(prompt_token_ids=p, params=SamplingParams(max_tokens=1, prompt_logprobs=0))
        for p in batch
    ]
    final = {}
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    return [final[i].prompt_logprobs[1:] for i in ids]


def hf_scores(model, batch: list[list[int]], size: int) -> list[list[float]]:
    out = []
    with torch.inference_mode():
        for lo in range(0, len(batch), size):
            part = batch[lo : lo + size]
            width = max(map(len, part))
            ids = torch.tensor([p + [0] * (width - len(p)) for p in part])
            mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in part])
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for row, p in enumerate(part):
                out.append(lp[row, : len(p) - 1].gather(1, ids[row, 1 : len(p), None])[:, 0].tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="transformers' batch (padded)")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    engine = LLMEngine(model=args.model, kv_cache_bytes=512 << 20, enable_prefix_caching=False)
    model = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()
    batch = prompts(engine.tokenizer, args.prompts)
    tokens = sum(len(p) - 1 for p in batch)
    tandem_scores(engine, batch[:2])  # warm-up: kernels, allocator
    hf_scores(model, batch[:2], args.batch)
    t0 = time.perf_counter()
    ours = tandem_scores(engine, batch)
    t1 = time.perf_counter()
    theirs = hf_scores(model, batch, args.batch)
    t2 = time.perf_counter()
    diff = max(abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y))
    print(f"scoring {args.prompts} prompts ({tokens} tokens), {torch.get_num_threads()} threads")
    print(f"{'':<14}{'tok/s':>10}")
    print(f"{'tandem':<14}{tokens / (t1 - t0):>10.0f}")
    print(f"{'transformers':<14}{tokens / (t2 - t1):>10.0f}")
    print(f"ratio {(t2 - t1) / (t1 - t0):.2f}x, largest log-probability difference {diff:.2e}")


if __name__ == "__main__":
    main()
