#!/usr/bin/env bash
# One call on a lent GPU machine, where nothing can be installed from the network: the CUDA tests,
# then benchmarks/bench_gpu.py's sections (the unmeasured ones first), results under $OUT.
#
# Prepare the kit here first (`make gpu-kit`: .gpu/wheels for what the machine's python3 lacks, and
# .gpu/tok, the built-in model's tokenizer), then run this with .gpu carried, e.g.
#   bash benchmarks/gpu_check.sh                      # every section
#   SECTIONS=greedy,disagg bash benchmarks/gpu_check.sh
# SMOKE=1 runs it all on this machine's CPU with tiny shapes (PYTHON=.venv/bin/python): a check of
# the script, not a measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/kernels/src:$PWD/proto/src:$PWD/worker/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The generated gRPC code needs grpcio >= 1.85.1 and protobuf >= 7.35.1 (proto/pyproject.toml).
if ! "$PYTHON" -c "import grpc, grpc_health, grpc_reflection, google.protobuf as p; \
        assert tuple(map(int, grpc.__version__.split('.')[:2])) >= (1, 85); \
        assert int(p.__version__.split('.')[0]) >= 7" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --find-links .gpu/wheels \
        grpcio grpcio-health-checking grpcio-reflection protobuf
fi
SECTIONS=${SECTIONS:-ceilings,greedy,disagg,kernels,fused_ops,lora,lora_decode,sampling,lora_sweep,lora_folded_sweep,attention,attention_partitions,llama8b,kv,greedy_random}
SMOKE_FLAG=()
if [[ -n "${SMOKE:-}" ]]; then
    SMOKE_FLAG=(--smoke)
else
    # What engine/streams.py relies on: torch's streams come from a pool that wraps (expect True).
    "$PYTHON" -c "import torch; s = [torch.cuda.Stream() for _ in range(33)]; \
        print('stream pool wraps at 32:', s[0].cuda_stream == s[32].cuda_stream)" | tee "$OUT/streams.txt"
    # The CUDA-only tests CI skips: KV staging through pinned buffers on side streams (--noconftest:
    # the suite's conftest runs Triton interpreted; the one test needing the built-in model is left out).
    "$PYTHON" -m pytest -q --noconftest -p no:cacheprovider tests/test_kv_staging.py -k "not cpu_sink" 2>&1 \
        | tail -5 | tee "$OUT/pytest.txt"
fi
TOKENIZER=(--tokenizer "${TANDEM_TOKENIZER:-.gpu/tok}")
if [[ -n "${SMOKE:-}" && -z "${TANDEM_TOKENIZER:-}" && ! -d .gpu/tok ]]; then
    TOKENIZER=()  # a smoke run here: the built-in model's own tokenizer, no kit needed
fi
"$PYTHON" benchmarks/bench_gpu.py "${TOKENIZER[@]}" --out "$OUT" \
    --sections "$SECTIONS" "${SMOKE_FLAG[@]}" 2>&1 | tee "$OUT/log.txt" | grep -v "^\[.*\]   " || true
"$PYTHON" - "$OUT/results.json" <<'PY'
# The headline figures (the reply of a device call carries only the end of the output).
import json
import sys

KEYS = ("fraction", "added", "speedup", "best", "equal", "_ok", "rel_err", "tokens_per_s", "ms_per_step",
        "MFU", "GBps", "TFLOPs", "error", "graphs", "eager", "folded", "_us", "partition", "same_")
results = json.load(open(sys.argv[1]))


def pick(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items() if any(w in k for w in KEYS)}


for name, section in results.items():
    if not isinstance(section, dict):
        continue
    print(f"{name}: {json.dumps(pick(section), default=str)[:700]}")
    nested = [(k, pick(v)) for k, v in section.items() if isinstance(v, dict)]
    # Per-projection rows are many; their per-layer totals say it.
    nested = [(k, v) for k, v in nested if v and not k.endswith(("_qkv", "_o", "_gate_up", "_down"))]
    for key, value in nested[:12]:
        print(f"  {key}: {json.dumps(value, default=str)[:700]}")
PY
