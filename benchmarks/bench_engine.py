"""Tandem's engine vs Hugging Face `transformers` `generate`, side by side in one process.

Same model (SmolLM2-135M, float32), same prompts, greedy, EOS ignored by both so every request
produces the same number of tokens. Prompt lengths for the mixed batches are drawn from the Azure
LLM inference trace (conversation), scaled down to fit a CPU:
  Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024
  (trace: github.com/Azure/AzurePublicDataset, CC-BY 4.0).

For each case it prints output tokens/s for both, the ratio, how many requests produced identical
tokens, and the ceiling implied by this machine's measured memory bandwidth and the bytes one
decode step must read (weights + the batch's KV cache).

Run: make bench   (or: python benchmarks/bench_engine.py --cases b1,b16 --repeat 1)
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem_worker.engine.loader import resolve_model
from tandem_worker.engine.sampling_params import SamplingParams
from tandem_worker.llm import LLM

TRACE = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "traces"
    / "AzureLLMInferenceTrace_conv.csv"
)


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    min_len: int
    max_len: int
    new_tokens: int


CASES = {
    "b1": Case("batch 1", 1, 128, 128, 64),
    "b16": Case("batch 16, mixed lengths", 16, 16, 512, 64),
    "b64": Case("batch 64, mixed lengths", 64, 16, 256, 32),
    # Where decode steps read more KV than weights: the attention's share of a step.
    "long": Case("batch 8, 512-2048 tokens", 8, 512, 2048, 128),
}


def trace_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """Prompt lengths shaped like the Azure conversation trace, scaled into [lo, hi]."""
    if lo == hi:
        return [lo] * n
    rng = random.Random(seed)
    if TRACE.is_file():
        with open(TRACE) as f:
            ctx = [int(r["ContextTokens"]) for r in csv.DictReader(f)]
        top = sorted(ctx)[int(len(ctx) * 0.95)]
        return [max(lo, min(hi, int(c / top * hi))) for c in rng.sample(ctx, n)]
    return [rng.randint(lo, hi) for _ in range(n)]


def make_prompts(tokenizer, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    words = (
        "river mountain engine kernel token cache paper garden violet copper silent rapid "
        "north market bridge winter signal orbit harbor lantern"
    ).split()
    prompts = []
    for n in lengths:
        text = " ".join(rng.choice(words) for _ in range(n + 8))
        prompts.append(tokenizer.encode(text)[:n])
    return prompts


def read_bandwidth_gbs() -> float:
    """Measured read bandwidth: a sum over a 512 MiB buffer, far larger than the caches.

    A copy's bytes / 2 would understate it: the copy also writes, and the writes first read their
    destination lines, so a decode step (which mostly reads weights) beat that "ceiling"."""
    src = torch.ones(128 * 2**20)
    src.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t)
    return src.numel() * 4 / best / 1e9


def run_tandem(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    # A repeat must compute its prompts again, as transformers does, not find them cached.
    llm.engine.block_manager.reset_prefix_cache()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t, [o.token_ids for o in outs]


def run_hf(model, pad_id: int, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # left padding, as HF wants
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    return time.perf_counter() - t, out[:, width:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="b1,b16,b64,long")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per side; the best is reported")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    folder = resolve_model(args.model)
    llm = LLM(str(folder), kv_cache_bytes=3 * 2**30)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pad_id = llm.tokenizer.hf.pad_token_id or 0
    cfg = llm.engine.model_config
    weight_bytes = llm.engine.runner.model.weight_bytes()
    kv_per_token = cfg.kv_bytes_per_token(4)
    bw = read_bandwidth_gbs()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
        f"measured read bandwidth {bw:.1f} GB/s; "
        f"weights {weight_bytes / 1e6:.0f} MB"
    )

    # Warm both sides once so neither pays first-call costs in the timings.
    warm = make_prompts(llm.tokenizer, [32, 48], seed=0)
    run_tandem(llm, warm, 4)
    run_hf(hf, pad_id, warm, 4)

    header = (
        f"{'case':<26}{'tandem tok/s':>13}{'hf tok/s':>10}{'ratio':>8}{'identical':>11}{'ceiling tok/s':>15}"
    )
    print(header)
    print("-" * len(header))
    for key in args.cases.split(","):
        case = CASES[key]
        lengths = trace_lengths(case.batch, case.min_len, case.max_len, seed=case.batch)
        prompts = make_prompts(llm.tokenizer, lengths, seed=case.batch)
        t_tan, tok_tan = min(
            (run_tandem(llm, prompts, case.new_tokens) for _ in range(args.repeat)), key=lambda r: r[0]
        )
        t_hf, tok_hf = min(
            (run_hf(hf, pad_id, prompts, case.new_tokens) for _ in range(args.repeat)), key=lambda r: r[0]
        )
        n_out = case.batch * case.new_tokens
        same = sum(a == b for a, b in zip(tok_tan, tok_hf))
        avg_ctx = sum(lengths) / len(lengths) + case.new_tokens / 2
        step_bytes = weight_bytes + case.batch * avg_ctx * kv_per_token
        ceiling = case.batch * bw * 1e9 / step_bytes
        print(
            f"{case.name:<26}{n_out / t_tan:>13.1f}{n_out / t_hf:>10.1f}{t_hf / t_tan:>7.2f}x"
            f"{f'{same}/{case.batch}':>11}{ceiling:>15.0f}"
        )
    print(
        "ceiling: decode-only tokens/s if a step read its bytes once at the measured read bandwidth;"
        " tok/s above include prefill."
    )


if __name__ == "__main__":
    main()
