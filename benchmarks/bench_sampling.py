"""Sampling a decode step's tokens: Tandem's sampler against `transformers`' own, side by side.

Both get the same float32 logits of a whole batch and pick one token per row: temperature 0.7
with top-p 0.9 (the usual chat setting), with top-k 50, or alone, and the chat setting with a
repetition penalty over each row's 512 prompt and 128 generated tokens. The baseline is what
`transformers` `generate` does per step when sampling: its logits processors (repetition penalty)
and warpers (temperature, top-k, top-p) over the batch, softmax, `torch.multinomial`. Tandem's
also keeps each request's tokens on its own seeded stream (one uniform per row from the host; see
engine/sampler.py). The logits are shaped like a language model's: a few likely tokens over a long
tail.

Times are the best of `--repeat` calls, in ms per decode step; ratio = transformers / Tandem.

Run: make bench   (or: python benchmarks/bench_sampling.py [--batches 1,16] [--vocab 128256] [--device cuda])
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tandem_worker.engine.sampler import Sampler
from tandem_worker.engine.sampling_params import SamplingParams

SETTINGS = {
    "top-p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "top-k 50": {"temperature": 0.7, "top_k": 50},
    "temperature": {"temperature": 0.7},
    "top-p, rep 1.3": {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.3},
}
PROMPT_TOKENS, OUTPUT_TOKENS = 512, 128  # each row's tokens seen, for the repetition penalty


def lm_like_logits(batch: int, vocab: int, device: str, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed rows: a Gumbel-ish spread puts most of the mass on tens to hundreds of tokens."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 2.0
    logits += torch.rand(batch, vocab, generator=g).log().neg().log().neg() * 1.5
    return logits.to(device)


def hf_sample(logits: torch.Tensor, setting: dict, seen: torch.Tensor) -> torch.Tensor:
    warpers = LogitsProcessorList()
    if "repetition_penalty" in setting:
        warpers.append(RepetitionPenaltyLogitsProcessor(setting["repetition_penalty"]))
    warpers.append(TemperatureLogitsWarper(setting["temperature"]))
    if "top_k" in setting:
        warpers.append(TopKLogitsWarper(setting["top_k"]))
    if "top_p" in setting:
        warpers.append(TopPLogitsWarper(setting["top_p"]))
    scores = warpers(seen, logits.clone())
    return torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0]


def best_ms(fn, repeat: int, device: str) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def compare(batches: list[int], vocab: int, device: str, repeat: int) -> dict:
    """{setting: {batch: (tandem ms, transformers ms)}}; Tandem's results are read back as lists,
    as the engine does, and the baseline's tokens too, so both include the wait for the device."""
    out: dict = {}
    sampler = Sampler(seed=0)
    for name, setting in SETTINGS.items():
        out[name] = {}
        for batch in batches:
            logits = lm_like_logits(batch, vocab, device)
            params = [SamplingParams(**setting) for _ in range(batch)]
            ids = [f"{name}-{batch}-{i}" for i in range(batch)]
            seen = torch.randint(
                vocab, (batch, PROMPT_TOKENS + OUTPUT_TOKENS), generator=torch.Generator().manual_seed(1)
            )
            history = [(row[:PROMPT_TOKENS], row[PROMPT_TOKENS:]) for row in seen.tolist()]
            seen = seen.to(device)
            ours = best_ms(lambda: sampler.sample(logits, ids, params, None, history), repeat, device)  # noqa: B023
            theirs = best_ms(lambda: hf_sample(logits, setting, seen).tolist(), repeat, device)  # noqa: B023
            out[name][batch] = (ours, theirs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2's; Llama-3's is 128256")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    results = compare(batches, args.vocab, args.device, args.repeat)
    threads = torch.get_num_threads()
    print(f"sampling one token per row, vocabulary {args.vocab}, {args.device}, {threads} threads")
    header = f"{'setting':<14}{'batch':>6}{'tandem ms':>11}{'hf ms':>10}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for name, rows in results.items():
        for batch, (ours, theirs) in rows.items():
            print(f"{name:<14}{batch:>6}{ours:>11.2f}{theirs:>10.2f}{theirs / ours:>7.1f}x")


if __name__ == "__main__":
    main()
