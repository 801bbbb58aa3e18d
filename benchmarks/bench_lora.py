"""Multi-LoRA serving throughput: 1 to 1,000 adapters in one batch vs no adapter vs one adapter at a time.

The setup follows S-LoRA (Sheng et al., "S-LoRA: Serving Thousands of Concurrent LoRA Adapters",
MLSys 2024, Section 7): adapters of mixed ranks {8, 16, 32, 64} on the attention projections
q, k, v and o (the only modules S-LoRA's implementation adapts; PEFT's default for Llama is q and
v alone, which would halve the LoRA work), and a request's adapter drawn from a power law
(Zipf, alpha = 1: adapter i is chosen with probability proportional to 1 / (i + 1)).

Adapters are real PEFT adapters for the built-in model (SmolLM2-135M, float32), written by
`PeftModel.save_pretrained` (benchmarks/make_adapters.py) once and kept under
.cache/adapters/bench-qkvo-v1. To keep the disk small, 100 distinct adapters are stored (about
1.4 GB); names 100 to 999 are folders of symlinks to those files (name i -> adapter i mod 100).
Every name is a separate adapter to the engine: read from the store, parsed, given KV blocks and
a slot, and evicted on its own, so 1,000 names cost the engine what 1,000 adapters would.

Workload (offline throughput): N requests (default 64) with prompts of 32 to 64 tokens, 32 output
tokens each, greedy with EOS ignored, all submitted at once. Every case serves the same prompts on
one engine (reset between cases: every adapter unloaded, counters zeroed; no prefix caching) whose
pool (default 1 GiB) holds the whole batch's KV plus about 60 average adapters at once (unified
paging), so at 1,000 adapters they are copied in and evicted as requests come and go. As in
S-LoRA, the adapters a case uses are read into host memory before its timed run (--cold: time
the store reads too); the timed run pays for copying them into the pool and evicting them.

Cases, side by side in one process (one warm-up first; a no-adapter run before the first case and
after each, each case compared with its neighbours; with --repeat, round after round, best kept):
- no adapter: the base model;
- K = 1, 10, 100, 1000 adapters: Tandem batches requests of different adapters together;
- PEFT-style, K = 100 (--peft-cases 10,100,1000 adds minutes): the same requests served the
  way a plain PEFT setup does (one PeftModel with `set_adapter` cannot mix adapters in a batch):
  grouped by adapter, each group run as its own batch to completion before the next one starts.
  It runs on Tandem's engine, so the kernels, the adapter loading and the model are the same;
  only the batching policy differs. With one adapter the two policies make the same batches, so
  that row reuses Tandem's run.

Targets (the LoRA issue): at 100 adapters, at most 20% slower than no adapter (on CPU), and at
least 4x the PEFT-style throughput.

Run: make bench   (or: python benchmarks/bench_lora.py [--quick] [--cases 1,10,100,1000]
[--requests 64] [--peft-cases 10,100,1000] [--repeat 2])
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem_kernels import cpu_extension
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.loader import resolve_model
from tandem_worker.engine.lora import LoRAStats, module_shapes
from tandem_worker.engine.sampling_params import SamplingParams

try:  # run as a script (python benchmarks/bench_lora.py): its folder is on sys.path
    from make_adapters import AdapterSpec, make_adapters
except ImportError:  # imported as benchmarks.bench_lora from the repository root
    from benchmarks.make_adapters import AdapterSpec, make_adapters

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / ".cache" / "adapters" / "bench-qkvo-v1"
RANKS = (8, 16, 32, 64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DISTINCT = 100  # adapters on disk
NAMES = 1000  # adapter names in the store
WORDS = (
    "river mountain engine kernel token cache paper garden violet copper silent rapid "
    "north market bridge winter signal orbit harbor lantern"
).split()


def name_of(i: int) -> str:
    return f"lora-{i:04d}"


def rank_of(i: int) -> int:
    return RANKS[(i % DISTINCT) % len(RANKS)]


def build_store(model_dir: Path, store: Path = STORE) -> Path:
    """DISTINCT real PEFT adapters plus NAMES - DISTINCT names that link to their files (made once)."""
    specs = [
        AdapterSpec(name_of(i), rank_of(i), TARGETS, alpha=2.0 * rank_of(i), seed=1000 + i, b_std=0.02)
        for i in range(DISTINCT)
    ]
    make_adapters(model_dir, store, specs)
    for i in range(DISTINCT, NAMES):
        folder = store / name_of(i)
        if (folder / "adapter_model.safetensors").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            link = folder / f
            if link.is_symlink():
                link.unlink()
            link.symlink_to(Path("..") / name_of(i % DISTINCT) / f)
    return store


def zipf_choices(n: int, k: int, alpha: float, seed: int) -> list[int]:
    """n adapter indices in [0, k), adapter i drawn with probability proportional to 1 / (i + 1)**alpha."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** alpha for i in range(k)]
    return rng.choices(range(k), weights=weights, k=n)


def make_prompts(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """n distinct prompts of lo to hi tokens (uniform), of words as in bench_engine.py."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        text = " ".join(rng.choice(WORDS) for _ in range(length + 8))
        prompts.append(tokenizer.encode(text)[:length])
    return prompts


@dataclass
class Result:
    seconds: float
    tokens: int
    distinct: int
    stats: LoRAStats
    preload_s: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def reset(engine: LLMEngine) -> None:
    """Drop every adapter from every tier and zero the counters: the next case starts cold."""
    resident = engine.lora.resident()
    for name in resident["device"] + resident["host"]:
        engine.lora.unload(name)
    engine.lora.stats = LoRAStats()


def drain(engine: LLMEngine, ids: set[str]) -> int:
    """Step until every request in ids has finished; return the output tokens they produced."""
    produced, left = 0, set(ids)
    while left:
        for o in engine.step():
            if o.error:
                raise RuntimeError(f"request {o.request_id} failed: {o.error}")
            if o.finished and o.request_id in left:
                left.discard(o.request_id)
                produced += len(o.token_ids)
    return produced


def serve(
    engine: LLMEngine,
    prompts: list[list[int]],
    adapters: list[str | None],
    params: SamplingParams,
    peft_style: bool,
    cold: bool = False,
) -> Result:
    """Serve the requests: all at once (Tandem), or grouped by adapter, group after group (PEFT-style).

    Unless `cold`, the adapters are first read into host memory, untimed (S-LoRA keeps every
    adapter in host memory); the timed run pays for copying them into the KV pool and evicting them.
    """
    reset(engine)
    names = list(dict.fromkeys(a for a in adapters if a is not None))
    t = time.perf_counter()
    if not cold:
        for name in names:
            engine.lora.load(name)
    preload_s = time.perf_counter() - t
    t = time.perf_counter()
    if peft_style:
        groups: dict[str | None, list[int]] = {}
        for i, a in enumerate(adapters):
            groups.setdefault(a, []).append(i)
        produced = 0
        for name, idx in groups.items():
            ids = {engine.add_request(prompt_token_ids=prompts[i], params=params, adapter=name) for i in idx}
            produced += drain(engine, ids)
    else:
        ids = {
            engine.add_request(prompt_token_ids=p, params=params, adapter=a)
            for p, a in zip(prompts, adapters)
        }
        produced = drain(engine, ids)
    seconds = time.perf_counter() - t
    # A copy: the next case's reset unloads (and counts evictions) through the live object.
    return Result(seconds, produced, len(names), copy.deepcopy(engine.lora.stats), preload_s)


def fmt_stats(r: Result) -> str:
    s = r.stats
    hits = "/".join(str(s.hits[k]) for k in ("device", "host", "store"))
    return f"{s.loads:>6}{s.device_loads:>8}{s.device_evictions:>7}{hits:>13}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=64, help="requests per case (default 64)")
    ap.add_argument("--cases", default="1,10,100,1000", help="adapter counts (no adapter always runs)")
    ap.add_argument("--quick", action="store_true", help="32 requests, 16 output tokens, 1 and 100 adapters")
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--kv-mib", type=int, default=1024, help="KV + adapter pool budget (MiB)")
    ap.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of adapter popularity")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per case; the best is reported")
    ap.add_argument("--cold", action="store_true", help="also time reading adapters from the store")
    ap.add_argument(
        "--peft-cases",
        default="100",
        help="adapter counts that also run the PEFT-style baseline (slow: one small batch per adapter)",
    )
    args = ap.parse_args()
    if args.quick:
        args.requests, args.output_tokens, args.cases, args.peft_cases = 32, 16, "1,100", "100"
    counts = [int(c) for c in args.cases.split(",") if c]
    if max(counts, default=0) > NAMES:
        ap.error(f"at most {NAMES} adapters")

    model_dir = resolve_model(args.model)
    t = time.perf_counter()
    store = build_store(model_dir)
    built = time.perf_counter() - t
    engine = LLMEngine(
        model=args.model,
        kv_cache_bytes=args.kv_mib * 2**20,
        lora_store=str(store),
        detokenize=False,
        # The prompts are distinct, but repeats (--repeat) would find their own KV cached.
        enable_prefix_caching=False,
    )
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    prompts = make_prompts(engine.tokenizer, args.requests, 32, 64, seed=0)
    cfg = engine.model_config
    bm = engine.block_manager
    kv_blocks = sum(-(-(len(p) + args.output_tokens) // bm.block_size) for p in prompts)
    block_bytes = engine.runner.layout.block_bytes
    shapes = module_shapes(cfg)
    per_rank = sum(sum(shapes[m]) for m in TARGETS) * cfg.num_hidden_layers * 4  # bytes per unit of rank
    avg_bytes = sum(RANKS) / len(RANKS) * per_rank
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
        f"{args.model}, float32; LoRA decode step: "
        + ("C++ op (tandem_kernels.cpu_extension)" if cpu_extension.load() else "TorchScript loop (no C++)")
    )
    print(
        f"adapters: {DISTINCT} distinct PEFT adapters on disk (ranks {'/'.join(map(str, RANKS))}, "
        f"targets {','.join(m[0] for m in TARGETS)}; average {avg_bytes / 2**20:.1f} MiB) and "
        f"{NAMES} names (names {DISTINCT}+ link to their files; each is its own adapter to the engine)"
        f" in {store} ({built:.1f} s)"
    )
    print(
        f"workload: {args.requests} requests, prompts 32-64 tokens, {args.output_tokens} output tokens, "
        f"greedy, all at once; adapter popularity Zipf alpha={args.alpha:g}"
    )
    print(
        f"pool: {args.kv_mib} MiB = {bm.num_blocks} blocks; the whole batch's KV takes {kv_blocks}, "
        f"leaving room for ~{(bm.num_blocks - kv_blocks) * block_bytes / avg_bytes:.0f} average adapters "
        f"at once"
    )

    # Warm up once, untimed: first-call costs of every op with and without adapters, and the
    # allocations of a full-size batch (else the first case timed pays for them).
    short = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    serve(engine, prompts, [None] * len(prompts), short, False)
    serve(engine, prompts, [name_of(i % 4) for i in range(len(prompts))], short, False)

    # Every case in turn, round after round (--repeat), with a no-adapter run before the first case
    # and after each one: a case is compared with the no-adapter runs next to it in time, so load
    # from other processes on the machine shifts both sides alike. Each case keeps its best round.
    workloads: dict[int, list[str | None]] = {0: [None] * args.requests}
    for k in counts:
        workloads[k] = [name_of(i) for i in zipf_choices(args.requests, k, args.alpha, seed=k)]
    # With one adapter both policies make the same batches: the baseline is Tandem's own run.
    peft_counts = {int(c) for c in args.peft_cases.split(",") if c}
    best: dict[tuple[int, bool], Result] = {}
    vs_none: dict[int, float] = {}  # case -> best ratio to its neighbouring no-adapter runs

    def run(k: int, peft_style: bool, round_: int) -> Result:
        r = serve(engine, prompts, workloads[k], params, peft_style, args.cold)
        if (k, peft_style) not in best or r.seconds < best[(k, peft_style)].seconds:
            best[(k, peft_style)] = r
        print(
            f"  round {round_ + 1}: {k} adapters{' PEFT-style' if peft_style else ''}: {r.tok_s:.1f} tok/s",
            file=sys.stderr,
            flush=True,
        )
        return r

    for round_ in range(args.repeat):
        before = run(0, False, round_)
        for k in counts:
            r = run(k, False, round_)
            after = run(0, False, round_)
            ratio = r.tok_s / ((before.tok_s + after.tok_s) / 2)
            vs_none[k] = max(vs_none.get(k, 0.0), ratio)
            before = after
        for k in counts:
            if k > 1 and k in peft_counts:
                run(k, True, round_)

    base = best[(0, False)]
    header = (
        f"{'case':<16}{'distinct':>9}{'tok/s':>8}{'vs none':>9}{'PEFT-style':>11}{'vs PEFT':>9}"
        f"{'loads':>6}{'dev-ld':>8}{'evict':>7}{'hits d/h/s':>13}"
    )
    print(header)
    print("-" * len(header))
    print(f"{'no adapter':<16}{'-':>9}{base.tok_s:>8.1f}{'1.00x':>9}{'':>11}{'':>9}")
    results: dict[int, tuple[Result, Result | None]] = {}
    for k in counts:
        tandem = best[(k, False)]
        peft = tandem if k == 1 else best.get((k, True))
        results[k] = (tandem, peft)
        peft_cols = f"{peft.tok_s:>11.1f}{tandem.tok_s / peft.tok_s:>8.2f}x" if peft else f"{'':>11}{'':>9}"
        print(
            f"{f'{k} adapter' + ('s' if k > 1 else ''):<16}{tandem.distinct:>9}{tandem.tok_s:>8.1f}"
            f"{vs_none[k]:>8.2f}x{peft_cols}{fmt_stats(tandem)}"
        )
    print(
        "tok/s: output tokens per second of wall time, first request in to last out. distinct: adapters"
        " the requests use. PEFT-style: the same requests grouped by adapter, one group's batch run to"
        " completion before the next (Tandem's engine and kernels; only the batching differs)."
    )
    print(
        "vs none: against the mean of the no-adapter runs just before and after (the no-adapter row"
        " shows the best of them). loads: store -> host reads"
        + ("" if args.cold else " (done before timing: adapters start in host memory, as in S-LoRA)")
        + "; dev-ld/evict: copies into / evictions from the KV pool; hits: requests whose adapter was"
        " on the device / in host memory / only in the store when they arrived."
    )
    if 100 in results:
        tandem, peft = results[100]
        slower = 1 - vs_none[100]
        print(
            f"target: 100 adapters at most 20% slower than no adapter: {slower:.0%} slower -> "
            f"{'met' if slower <= 0.20 else 'MISSED'}"
        )
        if peft is not None:
            ratio = tandem.tok_s / peft.tok_s
            print(
                f"target: 100 adapters at least 4x PEFT-style: {ratio:.2f}x -> "
                f"{'met' if ratio >= 4 else 'MISSED'}"
            )


if __name__ == "__main__":
    main()
