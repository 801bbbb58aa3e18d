"""The engine's host work per decode step: what a GPU waits on between two CUDA graph replays.

On a GPU the engine's step is serial: schedule, fill the graph's inputs, replay, read back the
sampled tokens, append them, build the outputs, then the next step. Everything but the replay is
Python on the host, and the GPU idles while it runs, so at large batches it is a visible share of
a decode step (the last H100 run: 18 ms per step at batch 256 on Llama-3-8B shapes, where the
weights and KV alone take about 7 ms).

This measures that host work alone, on any machine: the engine runs decode steps with CUDA graph
stand-ins (tests/engine/test_decode_graphs.py) whose replay does nothing, on a one-layer model with a
64-token vocabulary, so a step's time is the engine's bookkeeping (and a negligible argmax). Requests
are greedy, EOS ignored, with 64-token prompts; the timed steps are decode-only, taken from the
middle of a run of `--tokens` output tokens.

Baseline, in the same run: the floor, the least any engine does per decode step: write each row's
token, position, KV slot and block table into the pinned input buffers, copy them to the graph's
static tensors, read back the argmax and append each token to its request. The ratio is the
engine's host time over the floor's.

Run: make bench   (or: python benchmarks/bench_host.py [--batches 1,64,256] [--tokens 256] [--profile])
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tandem_worker.engine.block_manager import cache_slots
from tandem_worker.engine.cuda_graphs import DecodeGraphs
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.loader import resolve_model
from tandem_worker.engine.sampling_params import SamplingParams

# One small layer: the forward pass is never timed (replays are no-ops), only built for capture.
TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,  # the argmax over it is device work on a GPU: kept negligible here
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
PROMPT = 64
H100_MS_PER_STEP = Path(__file__).parent / "results" / "gpu-h100-run2.json"


def tiny_model_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tandem-host-"))
    (folder / "config.json").write_text(json.dumps(TINY))
    for f in resolve_model("smollm2-135m").glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    return folder


def make_engine(folder: Path, max_batch: int, max_len: int) -> LLMEngine:
    engine = LLMEngine(
        model=str(folder),
        load_format="dummy",
        kv_cache_bytes=64 << 20,
        max_num_seqs=max_batch,
        max_num_batched_tokens=max(PROMPT * max_batch, 2048),
        max_model_len=max_len,
        enable_prefix_caching=False,
        detokenize=False,  # as on a worker behind the router, which detokenizes
    )
    runner = engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.kv_cache, max_batch, -(-max_len // runner.block_size))
    runner.graphs.capture()
    for graph in runner.graphs._graphs.values():
        graph.replay = lambda: None  # the GPU's share: not timed here
    return engine


def engine_steps(engine: LLMEngine, batch: int, tokens: int, profile: cProfile.Profile | None) -> list[float]:
    """Seconds of each decode-only step from the middle half of a run of `tokens` tokens."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(prompt_token_ids=[3 + (i + j) % 60 for j in range(PROMPT)], params=params)
    times: list[float] = []
    step = 0
    while engine.num_unfinished:
        timed = tokens // 4 <= step < 3 * tokens // 4
        if timed and profile is not None:
            profile.enable()
        t0 = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - t0
        if profile is not None:
            profile.disable()
        if timed:
            times.append(elapsed)
        step += 1
    return times


def floor_steps(engine: LLMEngine, batch: int, steps: int) -> list[float]:
    """The floor loop over `batch` rows, on the engine's own graph buffers (see the module doc)."""
    graphs = engine.runner.graphs
    bs = engine.runner.block_size
    width = -(-(PROMPT + steps + 1) // bs)
    tables = [list(range(i * width, (i + 1) * width)) for i in range(batch)]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    logits = torch.zeros(batch, TINY["vocab_size"])
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        pos = [PROMPT + step] * batch
        ids = [o[-1] if o else 5 for o in outputs]
        slots = [s for t, p in zip(tables, pos) for s in cache_slots(t, p, p + 1, bs)]
        graphs.run(ids, pos, slots, tables)
        for out, tok in zip(outputs, logits.argmax(dim=-1).tolist()):
            out.append(tok)
        times.append(time.perf_counter() - t0)
    return times


def h100_ms(batch: int) -> float | None:
    try:
        llama = json.loads(H100_MS_PER_STEP.read_text())["llama8b"]
        return llama[f"decode_b{batch}"]["tandem_ms_per_step"]
    except (OSError, KeyError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--tokens", type=int, default=256, help="output tokens per request")
    ap.add_argument("--repeat", type=int, default=3, help="runs per batch size; the best median is kept")
    ap.add_argument("--profile", action="store_true", help="print where the engine's host time goes")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the host work is one Python thread; keep the argmax from spreading
    batches = [int(b) for b in args.batches.split(",")]
    folder = tiny_model_folder()
    engine = make_engine(folder, max(batches), PROMPT + args.tokens + 16)
    profile = cProfile.Profile() if args.profile else None
    print(
        f"engine host work per decode step, {args.tokens} output tokens per request "
        f"(medians, best of {args.repeat})"
    )
    print(
        f"{'batch':>6} {'engine us/step':>15} {'us/seq':>8} {'floor us/step':>14} "
        f"{'engine/floor':>13} {'vs H100 step':>13}"
    )
    for batch in batches:
        runs = range(args.repeat)
        ours = min(statistics.median(engine_steps(engine, batch, args.tokens, profile)) for _ in runs)
        floor = min(statistics.median(floor_steps(engine, batch, args.tokens // 2)) for _ in runs)
        gpu = h100_ms(batch)
        share = f"{ours * 1e3 / gpu:12.0%}" if gpu else f"{'-':>12}"
        print(
            f"{batch:>6} {ours * 1e6:>15.0f} {ours * 1e6 / batch:>8.1f} {floor * 1e6:>14.0f} "
            f"{ours / floor:>12.2f}x {share}"
        )
    print("vs H100 step: host time here over the whole step an H100 took (gpu-h100-run2.json)")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
