"""Structured outputs' cost per decode step: the same batch with and without a JSON Schema.

Each of `--batches` runs a batch of chat requests on the built-in model twice, side by side in
one process: once under a JSON Schema (an array of 40 small integers, so no request ends before
`--tokens`), once free (EOS ignored); the same prompts, greedy, the same number of tokens. Reported:
ms per decode step of each (the median of the decode-only steps) and their ratio, and the host
work the schema adds per step, timed alone: the rows' masks (llguidance, in parallel) and their
application to the logits. On a GPU the masks are computed while the step's model runs (the
engine only launched it), so that part hides under the forward pass when it is shorter.

Run: make bench   (or: python benchmarks/bench_structured.py [--batches 1,16,64] [--tokens 32]
[--device cuda])
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.sampler import _mask_disallowed
from tandem_worker.engine.sampling_params import SamplingParams, StructuredOutputs

SCHEMA = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 999},
    "minItems": 40,
    "maxItems": 40,
}


def decode_ms(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    """Median ms of the decode-only steps, and the tokens generated."""
    for p in prompts:
        engine.add_request(prompt_token_ids=p, params=params)
    times, tokens = [], 0
    while engine.has_unfinished():
        decoding = not engine.scheduler.waiting and all(not s.is_prefilling for s in engine.scheduler.running)
        t0 = time.perf_counter()
        outs = engine.step()
        if decoding:
            times.append(time.perf_counter() - t0)
        tokens += sum(len(o.new_token_ids) for o in outs)
    return statistics.median(times) * 1e3, tokens


def mask_ms(engine: LLMEngine, so: StructuredOutputs, batch: int, repeat: int = 20) -> float:
    """Best ms of one step's masks for `batch` rows mid-way through their arrays, applied to logits."""
    matchers = []
    for _ in range(batch):
        m = engine.grammars.matcher(so)
        assert m.consume_tokens(engine.tokenizer.encode("[12, 345, 6, 78"))
        matchers.append(m)
    logits = torch.randn(batch, engine.model_config.vocab_size, device=engine.runner.device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        _mask_disallowed(logits, list(range(batch)), engine.grammars.masks(matchers))
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    engine = LLMEngine(
        model=args.model, device=args.device, max_num_seqs=max(batches), kv_cache_bytes=512 << 20
    )
    so = StructuredOutputs(json=json.dumps(SCHEMA))
    constrained = SamplingParams(max_tokens=args.tokens, temperature=0.0, structured_outputs=so)
    free = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    asks = ["List some numbers.", "Give me forty integers.", "Numbers, please.", "Count for me."]
    print(
        f"JSON Schema vs free decoding, {args.model}, {torch.get_num_threads()} threads, {args.tokens} tokens"
    )
    header = f"{'batch':>6}{'free ms':>10}{'schema ms':>11}{'ratio':>8}{'masks ms':>10}"
    print(header)
    print("-" * len(header))
    decode_ms(engine, [engine.tokenizer.chat_prompt("warm up")], constrained)  # tokenizer, caches
    for batch in batches:
        prompts = [engine.tokenizer.chat_prompt(f"{asks[i % len(asks)]} ({i})") for i in range(batch)]
        free_ms, free_tokens = decode_ms(engine, prompts, free)
        schema_ms, schema_tokens = decode_ms(engine, prompts, constrained)
        assert free_tokens == schema_tokens == batch * args.tokens, (free_tokens, schema_tokens)
        masks = mask_ms(engine, so, batch)
        print(f"{batch:>6}{free_ms:>10.1f}{schema_ms:>11.1f}{schema_ms / free_ms:>7.2f}x{masks:>10.2f}")


if __name__ == "__main__":
    main()
