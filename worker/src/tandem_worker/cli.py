"""The `tandem` command line."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .engine.sampling_params import SAMPLING_REQUEST_FIELDS
from .server.openai_tools import TOOL_CALL_PARSERS

SAMPLING_FIELDS = (*SAMPLING_REQUEST_FIELDS, "logprobs", "top_logprobs", "prompt_logprobs")


class CLIError(Exception):
    """An error the user can fix; printed without a traceback."""


# argparse `type=` checks: a bad value is refused (exit 2, naming the flag) before anything starts,
# rather than deep inside a server that is already half up.
def _int_in(lo: int, hi: int | None = None, hint: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be {bounds}{hint}, got {value}")
        return value

    return parse


def _float_above(lo: float, inclusive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        # NaN compares false with everything, so it would slip through the bound check alone.
        if not math.isfinite(value) or value < lo or (value == lo and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {lo:g}, got {text}")
        return value

    return parse


def http_url(text: str) -> str:
    """An http(s) URL with a host (a Prometheus base URL): a typo otherwise surfaced only as the
    autoscaler's "holding" message, every few seconds, for as long as it ran."""
    from urllib.parse import urlparse

    try:
        parsed = urlparse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a URL: {e}") from None
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise argparse.ArgumentTypeError(
            f"expected an http(s) URL such as http://localhost:9090, got {text!r}"
        )
    return text


positive_int = _int_in(1)
non_negative_int = _int_in(0)
positive_float = _float_above(0.0, inclusive=False)
non_negative_float = _float_above(0.0, inclusive=True)
# gRPC takes a port modulo 65536 and the HTTP servers overflow, so out-of-range ports must stop here.
port = _int_in(1, 65535)
port_or_off = _int_in(0, 65535, " (0: off)")  # only for flags whose help says 0 turns the server off


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--seed", type=int, default=None, help="per-request seed: same seed, same output")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2] (default 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2] (default 0)")
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="transformers' and vLLM's, > 0 (1: none)"
    )
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the most likely's")
    p.add_argument("--min-tokens", type=int, default=0, help="no EOS nor stop token id before this many")
    p.add_argument("--logprobs", action="store_true", help="report each generated token's log-probability")
    p.add_argument(
        "--prompt-logprobs",
        type=int,
        default=None,
        metavar="N",
        help="report each prompt token's log-probability and the N most likely tokens there (0-20)",
    )
    so = p.add_mutually_exclusive_group()
    so.add_argument(
        "--json-schema",
        metavar="SCHEMA",
        help="the text is JSON valid under this JSON Schema (a file or JSON text)",
    )
    so.add_argument("--json-object", action="store_true", help="the text is a JSON object")
    so.add_argument("--regex", help="the whole text matches this regular expression (Rust's syntax)")
    so.add_argument("--choice", action="append", help="the text is one of these strings (repeatable)")
    so.add_argument(
        "--grammar", metavar="FILE", help="the text follows this Lark grammar (llguidance's dialect)"
    )
    p.add_argument(
        "--top-logprobs",
        type=int,
        default=0,
        metavar="N",
        help="also report the N most likely tokens at each position (at most 20; implies --logprobs)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem: disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text offline with the built-in engine")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="JSON lines: {'prompt': ..., optional sampling fields}")
    # Offline-only flags default to None so that passing them with --endpoint can be refused.
    g.add_argument(
        "--model", default=None, help="offline: built-in name, GGUF file or HF folder (default smollm2-135m)"
    )
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per prompt, in input order (with --stream: one per chunk, with its 'index')",
    )
    g.add_argument("--device", default=None, help="offline: cpu (the default), cuda or cuda:N")
    g.add_argument(
        "--kv-cache-bytes", type=positive_int, default=None, help="offline: KV cache budget in bytes"
    )
    g.add_argument("--endpoint", help="HOST:PORT of a Tandem router: generate remotely instead of offline")
    g.add_argument("--stream", action="store_true", help="with --endpoint: print text as it arrives")
    g.add_argument(
        "--timeout", type=positive_float, default=None, help="with --endpoint: deadline per request (s)"
    )
    g.add_argument("--adapter", default="", help="LoRA adapter name ('adapter' per line in --prompts-file)")
    g.add_argument("--lora-store", default=None, help="offline: folder of PEFT adapters, one sub-folder each")
    _add_sampling_args(g)

    w = sub.add_parser("worker", help="serve one engine over gRPC as a prefill, decode or colocated worker")
    w.add_argument("--role", required=True, choices=["prefill", "decode", "colocated"])
    w.add_argument("--model", default="smollm2-135m")
    w.add_argument("--host", default="127.0.0.1")
    w.add_argument("--port", type=port, default=50061)
    w.add_argument("--metrics-port", type=port_or_off, default=0, help="HTTP port of /metrics (0: off)")
    w.add_argument("--device", default="cpu")
    w.add_argument("--kv-cache-bytes", type=positive_int, default=None)
    w.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: bf16 on CUDA"
    )
    w.add_argument(
        "--cuda-graph-max-batch",
        type=non_negative_int,
        default=256,
        help="CUDA: replay captured graphs for decode batches up to this size (0: always eager)",
    )
    w.add_argument(
        "--cuda-graph-max-lora-rank",
        type=non_negative_int,
        default=64,
        help="CUDA: decode batches with adapters of at most this rank replay graphs too (0: eager)",
    )
    w.add_argument(
        "--cuda-graph-lora-fold-rank",
        type=non_negative_int,
        default=0,
        help="CUDA: extra weight rows per projection part (in rank units) that hold the adapters of"
        " the running batch, whose LoRA shrink then runs inside the base GEMMs (0: off)",
    )
    w.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    w.add_argument(
        "--sampling-seed",
        type=int,
        default=None,
        help="seed of the draws of requests that set none (default: random per process, so replicas"
        " and restarts differ)",
    )
    w.add_argument("--lora-store", default=None, help="folder of PEFT LoRA adapters, one sub-folder each")
    w.add_argument(
        "--lora-host-cache-bytes",
        type=non_negative_int,
        default=2 * 2**30,
        help="host memory for adapters (LRU)",
    )
    w.add_argument(
        "--adapters-config",
        default=None,
        help="JSON file whose 'adapters' list of {name, path} names adapters (the operator's engine.json)",
    )
    w.add_argument(
        "--max-pending", type=positive_int, default=256, help="requests in flight before RESOURCE_EXHAUSTED"
    )
    w.add_argument(
        "--max-queued-prefill-tokens",
        type=non_negative_int,
        default=0,
        metavar="TOKENS",
        help="prefill: refuse new KV pulls as busy (the router tries another prefill worker) while "
        "unfinished prompts hold this many tokens; about prefill tokens/s times the wait allowed in "
        "its queue (default 0: no bound)",
    )
    w.add_argument(
        "--kv-send-backlog-bytes",
        type=positive_int,
        default=64 * 2**20,
        help="prefill: a request's KV not yet sent beyond which its next chunk waits for the reader "
        "(default 64 MiB)",
    )
    w.add_argument(
        "--kv-send-backlog-total-bytes",
        type=positive_int,
        default=4 * 2**30,
        help="prefill: KV not yet sent, over all requests, beyond which new KV pulls are refused as busy "
        "(default 4 GiB)",
    )
    w.add_argument(
        "--kv-idle-timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="decode: give up on a KV pull that receives nothing for this long; prefill workers beat "
        "for the timeout each pull names (default: $TANDEM_KV_IDLE_TIMEOUT_S, else 30)",
    )
    w.add_argument(
        "--engine-stall-timeout",
        type=non_negative_float,
        default=None,
        metavar="SECONDS",
        help="call the engine stuck when one step with work makes no progress for this long: health "
        "NOT_SERVING, also for the liveness service 'tandem.liveness', until it moves again; above "
        "the slowest legitimate step, a first request's kernel compiles (default 120; 0: never)",
    )
    w.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM (keep it below the pod's grace period)",
    )

    r = sub.add_parser("router", help="serve the gRPC inference endpoint in front of workers")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=port, default=50051)
    r.add_argument("--metrics-port", type=port_or_off, default=0, help="HTTP port of /metrics (0: off)")
    r.add_argument(
        "--decode",
        action="append",
        default=[],
        help="decode or colocated worker: HOST:PORT or dns:NAME:PORT (repeatable)",
    )
    r.add_argument(
        "--prefill", action="append", default=[], help="prefill worker: HOST:PORT or dns:NAME:PORT"
    )
    r.add_argument("--max-in-flight", type=positive_int, default=512)
    r.add_argument(
        "--slo-ttft-ms", type=positive_float, default=2000.0, help="time-to-first-token SLO (default 2000)"
    )
    r.add_argument(
        "--slo-tpot-ms", type=positive_float, default=200.0, help="time-per-output-token SLO (default 200)"
    )
    r.add_argument(
        "--http-port",
        type=port_or_off,
        default=0,
        help="port of the OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/...); 0: off",
    )
    r.add_argument(
        "--kserve-port",
        type=port_or_off,
        default=0,
        help="port of KServe's Open Inference Protocol v2 over gRPC (Triton's clients); 0: off",
    )
    r.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients name (OpenAI 'model', KServe model_name, ListModels); default: --model",
    )
    r.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=None,
        help="the model's tool-call format (hermes: Qwen2.5 and later, Hermes 2/3), which OpenAI's "
        "tool_choice 'auto' reads calls in; without it 'auto' is refused",
    )

    u = sub.add_parser("up", help="run a whole deployment (workers + router) as local processes")
    u.add_argument("--prefill", type=non_negative_int, default=None, help="prefill workers (default 1)")
    u.add_argument("--decode", type=non_negative_int, default=None, help="decode workers (default 1)")
    u.add_argument(
        "--colocated", type=non_negative_int, default=0, help="colocated workers instead of prefill/decode"
    )
    u.add_argument("--port", type=port, default=50051, help="the router's port")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--model", default="smollm2-135m")
    u.add_argument(
        "--kv-cache-bytes", type=positive_int, default=1 << 30, help="KV budget per worker (default 1 GiB)"
    )
    u.add_argument("--device", default="cpu", help="every worker's device: cpu, cuda or cuda:N")
    u.add_argument("--log-dir", default=None, help="write each process's output to DIR/NAME.log")
    u.add_argument("--lora-store", default=None, help="folder of PEFT LoRA adapters for every worker")
    u.add_argument("--http-port", type=port_or_off, default=0, help="the router's OpenAI HTTP port (0: off)")
    u.add_argument(
        "--metrics-port",
        type=port_or_off,
        default=0,
        help="the router's /metrics port; the workers' are the next free ones above it "
        "(default 0: random free ports; all are printed once serving)",
    )
    u.add_argument(
        "--kserve-port", type=port_or_off, default=0, help="the router's KServe v2 gRPC port (0: off)"
    )
    u.add_argument(
        "--slo-ttft-ms", type=positive_float, default=2000.0, help="time-to-first-token SLO (default 2000)"
    )
    u.add_argument(
        "--slo-tpot-ms", type=positive_float, default=200.0, help="time-per-output-token SLO (default 200)"
    )
    a = u.add_argument_group("autoscaling (the operator's policy, on local processes)")
    a.add_argument("--autoscale", action="store_true", help="scale prefill and decode from measured goodput")
    a.add_argument("--max-prefill", type=positive_int, default=4, help="most prefill workers (default 4)")
    a.add_argument("--max-decode", type=positive_int, default=4, help="most decode workers (default 4)")
    a.add_argument("--attainment", type=float, default=0.9, help="SLO attainment target (default 0.9)")
    a.add_argument("--window", type=positive_float, default=60.0, help="metrics window, seconds (default 60)")
    a.add_argument(
        "--stabilization",
        type=non_negative_float,
        default=120.0,
        help="scale down only after this long (default 120 s)",
    )
    a.add_argument(
        "--cooldown",
        type=non_negative_float,
        default=30.0,
        help="seconds between changes of a pool (default 30)",
    )
    a.add_argument(
        "--min-requests",
        type=non_negative_int,
        default=20,
        help="fewer finished requests in a window: no SLO decision",
    )
    a.add_argument(
        "--burst-horizon",
        type=non_negative_float,
        default=600.0,
        help="prefill keeps capacity for the bursts of this many recent seconds (default 600; 0: off)",
    )
    a.add_argument(
        "--prometheus",
        type=http_url,
        default=None,
        help="read metrics from this Prometheus (URL) instead of scraping the processes directly",
    )
    a.add_argument(
        "--scrape-interval",
        type=positive_float,
        default=15.0,
        help="seconds between that Prometheus' scrapes (default 15): rate windows span at least 4",
    )
    a.add_argument(
        "--autoscale-dir",
        default=None,
        help="where the router's worker lists and Prometheus' file_sd targets.json go (default: a temp dir)",
    )
    d = sub.add_parser("demo", help="start 1 prefill + 1 decode locally, stream a few answers, stop")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--max-tokens", type=positive_int, default=64)
    b = sub.add_parser("bench", help="replay a request trace against an endpoint; report SLO attainment")
    b.add_argument("--trace", required=True, help="Azure LLM trace CSV or JSON lines (timestamp ms, ...)")
    b.add_argument("--endpoint", required=True, help="HOST:PORT of a Tandem router")
    b.add_argument(
        "--time-scale", type=positive_float, default=1.0, help="multiply arrival times (2: half the rate)"
    )
    b.add_argument("--max-requests", type=positive_int, default=None, help="replay only the first N requests")
    # The defaults of `tandem up` and `tandem router`: the report then judges as the router counts.
    b.add_argument(
        "--slo-ttft-ms", type=positive_float, default=2000.0, help="time-to-first-token SLO (default 2000)"
    )
    b.add_argument(
        "--slo-tpot-ms", type=positive_float, default=200.0, help="time-per-output-token SLO (default 200)"
    )
    b.add_argument("--json", action="store_true", help="print the report as one JSON object")
    o = sub.add_parser("operator", help="run the Kubernetes operator for ModelDeployment resources (Kopf)")
    try:  # tandem_operator.main imports only the standard library at module level
        from tandem_operator.main import add_arguments as add_operator_arguments
    except ImportError:  # the worker image without the operator package: `tandem operator` says so
        add_operator_arguments = None
    if add_operator_arguments is not None:
        add_operator_arguments(o)
    return parser


def _read_prompts(args: argparse.Namespace) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [{"prompt": p} for p in args.prompt]
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise CLIError(f"{args.prompts_file}:{n}: not JSON: {e}") from None
                    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                        raise CLIError(f"{args.prompts_file}:{n}: needs a string field 'prompt'")
                    unknown = set(item) - {"prompt", "chat", "adapter", *SAMPLING_FIELDS}
                    if unknown:
                        raise CLIError(f"{args.prompts_file}:{n}: unknown fields {sorted(unknown)}")
                    items.append(item)
        except OSError as e:
            raise CLIError(f"--prompts-file: cannot read {args.prompts_file}: {e.strerror}") from None
    if not items:
        raise CLIError("give at least one --prompt or a --prompts-file")
    for i, item in enumerate(items):
        if not item["prompt"]:
            raise CLIError(f"prompt {i}: prompt: must not be empty")
    return items


def _print_record(item: dict[str, Any], out: Any, as_json: bool) -> None:
    """One prompt's answer; `out` is a RequestOutput (offline) or a Completion (an endpoint's)."""
    if as_json:
        record = {
            "prompt": item["prompt"],
            "prompt_token_ids": list(out.prompt_token_ids),
            "token_ids": list(out.token_ids),
            "text": out.text,
            "finish_reason": out.finish_reason,
        }
        if out.logprobs:
            record["logprobs"] = list(out.logprobs)
        if out.top_logprobs:
            record["top_logprobs"] = [[list(pair) for pair in top] for top in out.top_logprobs]
        if out.prompt_logprobs is not None:
            record["prompt_logprobs"] = list(out.prompt_logprobs)
        if out.prompt_top_logprobs:
            record["prompt_top_logprobs"] = [[list(pair) for pair in top] for top in out.prompt_top_logprobs]
        print(json.dumps(record, ensure_ascii=False), flush=True)
    else:
        print(f"--- {item['prompt']!r}\n{out.text}", flush=True)


def _stream_chunk(index: int, msg: Any) -> dict[str, Any]:
    """One `--stream --json` line. Its fields are the non-streamed record's, split over the chunks:
    the first carries prompt_token_ids, the last a finish_reason (null before), and logprobs come
    with their tokens when asked for; `index` says which prompt (input order) the chunk extends."""
    from .server.convert import FINISH_FROM_PB, prompt_logprobs_from_pb, top_logprobs_from_pb

    chunk: dict[str, Any] = {"index": index}
    if msg.prompt_token_ids:
        chunk["prompt_token_ids"] = list(msg.prompt_token_ids)
    chunk["text"] = msg.text
    chunk["token_ids"] = list(msg.token_ids)
    if msg.logprobs:
        chunk["logprobs"] = list(msg.logprobs)
    if msg.top_logprobs:
        chunk["top_logprobs"] = [[list(pair) for pair in top_logprobs_from_pb(t)] for t in msg.top_logprobs]
    if msg.HasField("prompt_logprobs"):
        chunk["prompt_logprobs"], top = prompt_logprobs_from_pb(msg.prompt_logprobs)
        if msg.prompt_logprobs.top_logprobs:
            chunk["prompt_top_logprobs"] = [[list(pair) for pair in t] for t in top]
    chunk["finish_reason"] = FINISH_FROM_PB[msg.finish_reason] if msg.finish_reason else None
    return chunk


def _generate_remote(args: argparse.Namespace, items: list[dict[str, Any]], params: list[Any]) -> int:
    import grpc

    from .server.client import Client, build_request

    chat = [bool(it.get("chat", args.chat)) for it in items]
    requests = [
        build_request(it["prompt"], p, c, adapter=it.get("adapter", args.adapter))
        for it, p, c in zip(items, params, chat)
    ]
    partial_line = False  # streamed text not yet ended by a newline
    try:
        with Client(args.endpoint) as client:
            if args.stream:
                for index, (item, req) in enumerate(zip(items, requests)):
                    if not args.json:
                        print(f"--- {item['prompt']!r}", flush=True)
                    for msg in client.stream(req, args.timeout):
                        if args.json:
                            print(json.dumps(_stream_chunk(index, msg), ensure_ascii=False), flush=True)
                        elif msg.text:
                            print(msg.text, end="", flush=True)
                            partial_line = not msg.text.endswith("\n")
                    if not args.json:
                        print(flush=True)
                        partial_line = False
                return 0
            for item, c in zip(items, client.complete_all(requests, args.timeout)):
                _print_record(item, c, args.json)
    except grpc.RpcError as e:
        if partial_line:
            # A stream cut off mid-line: the error goes on a line of its own, not after the text.
            print(flush=True)
        raise CLIError(f"{args.endpoint}: {e.code().name}: {e.details()}") from None
    return 0


# Flags that only the offline engine reads; a router has its own model, device and KV budget.
OFFLINE_ONLY = ("model", "device", "kv_cache_bytes", "lora_store")
REMOTE_ONLY = ("stream", "timeout")


def _check_generate_mode(args: argparse.Namespace) -> None:
    def given(names: tuple[str, ...]) -> list[str]:
        return ["--" + n.replace("_", "-") for n in names if getattr(args, n) not in (None, False)]

    if args.endpoint:
        if ignored := given(OFFLINE_ONLY):
            raise CLIError(f"{', '.join(ignored)}: offline only; the router at --endpoint chooses these")
    elif needs := given(REMOTE_ONLY):
        raise CLIError(f"{', '.join(needs)}: only with --endpoint (offline generation returns whole answers)")


def _structured_outputs(args: argparse.Namespace) -> dict[str, Any] | None:
    """The structured-output flags as the request object SamplingParams reads."""
    if args.json_schema is not None:
        text = args.json_schema
        if not text.lstrip().startswith(("{", "true", "false")):
            try:
                text = Path(text).read_text()
            except OSError as e:
                raise CLIError(f"--json-schema: {e}") from None
        return {"json": text}
    if args.grammar is not None:
        try:
            return {"grammar": Path(args.grammar).read_text()}
        except OSError as e:
            raise CLIError(f"--grammar: {e}") from None
    if args.json_object:
        return {"json_object": True}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice:
        return {"choice": args.choice}
    return None


def _cmd_generate(args: argparse.Namespace) -> int:
    _check_generate_mode(args)
    items = _read_prompts(args)
    from .engine.sampling_params import SamplingParams, json_token_id

    defaults = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "repetition_penalty": args.repetition_penalty,
        "min_p": args.min_p,
        "min_tokens": args.min_tokens,
        "logprobs": args.logprobs,
        "top_logprobs": args.top_logprobs,
        "prompt_logprobs": args.prompt_logprobs,
        "structured_outputs": _structured_outputs(args),
    }
    params = []
    for i, item in enumerate(items):
        fields = {**defaults, **{k: v for k, v in item.items() if k in SAMPLING_FIELDS}}
        bias = fields.get("logit_bias")
        if isinstance(bias, dict):  # JSON's keys are strings: token ids as "50256", as OpenAI's
            fields["logit_bias"] = {}
            for k, v in bias.items():
                token = json_token_id(k)
                if token is None:
                    raise CLIError(f"prompt {i}: logit_bias: keys must be token ids, got {k!r}")
                fields["logit_bias"][token] = v
        try:
            params.append(SamplingParams(**fields))
        except (ValueError, TypeError) as e:
            raise CLIError(f"prompt {i}: {e}") from None
    if args.endpoint:
        return _generate_remote(args, items, params)
    from .llm import LLM, ChatPrompt

    kwargs: dict[str, Any] = {"device": args.device or "cpu"}
    if args.kv_cache_bytes is not None:
        kwargs["kv_cache_bytes"] = args.kv_cache_bytes
    if args.lora_store:
        kwargs["lora_store"] = args.lora_store
    llm = LLM(args.model or "smollm2-135m", **kwargs)
    prompts = [
        ChatPrompt([{"role": "user", "content": it["prompt"]}]) if it.get("chat", args.chat) else it["prompt"]
        for it in items
    ]
    outputs = llm.generate(prompts, params, adapters=[it.get("adapter", args.adapter) for it in items])
    for item, out in zip(items, outputs):
        _print_record(item, out, args.json)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from .engine.config import EngineConfig
    from .server.worker_main import serve_worker

    config = EngineConfig(
        model=args.model,
        device=args.device,
        kv_cache_bytes=args.kv_cache_bytes,
        dtype=args.dtype,
        cuda_graph_max_batch=args.cuda_graph_max_batch,
        cuda_graph_max_lora_rank=args.cuda_graph_max_lora_rank,
        cuda_graph_lora_fold_rank=args.cuda_graph_lora_fold_rank,
        max_num_batched_tokens=args.max_num_batched_tokens,
        sampling_seed=args.sampling_seed,
        lora_store=args.lora_store,
        lora_host_cache_bytes=args.lora_host_cache_bytes,
        kv_send_backlog_bytes=args.kv_send_backlog_bytes,
        kv_send_backlog_total_bytes=args.kv_send_backlog_total_bytes,
    )
    adapters = _read_adapters_config(args.adapters_config) if args.adapters_config else {}
    return serve_worker(
        args.role,
        config,
        args.host,
        args.port,
        args.metrics_port,
        max_pending=args.max_pending,
        adapters=adapters,
        drain_timeout=args.drain_timeout,
        kv_idle_timeout_s=args.kv_idle_timeout,
        max_queued_prefill_tokens=args.max_queued_prefill_tokens,
        engine_stall_timeout_s=args.engine_stall_timeout,
    )


def _read_adapters_config(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f).get("adapters", [])
        return {e["name"]: e["path"] for e in entries}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CLIError(
            f"--adapters-config {path}: expected {{'adapters': [{{name, path}}, ...]}}: {e}"
        ) from None


def _cmd_router(args: argparse.Namespace) -> int:
    from .server.router import SLO
    from .server.router_main import serve_router

    serve_router(
        args.model,
        args.decode,
        args.prefill,
        args.host,
        args.port,
        args.metrics_port,
        max_in_flight=args.max_in_flight,
        http_port=args.http_port,
        kserve_port=args.kserve_port,
        served_model_name=args.served_model_name,
        tool_call_parser=args.tool_call_parser,
        slo=SLO(args.slo_ttft_ms / 1000.0, args.slo_tpot_ms / 1000.0),
    )
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from .server.local import LocalDeployment, up

    if args.colocated:
        prefill, decode = args.prefill or 0, args.decode or 0
    else:
        prefill, decode = (
            args.prefill if args.prefill is not None else 1,
            args.decode if args.decode is not None else 1,
        )
    return up(
        LocalDeployment(
            prefill=prefill,
            decode=decode,
            colocated=args.colocated,
            port=args.port,
            host=args.host,
            model=args.model,
            kv_cache_bytes=args.kv_cache_bytes,
            device=args.device,
            log_dir=args.log_dir,
            lora_store=args.lora_store,
            http_port=args.http_port,
            kserve_port=args.kserve_port,
            metrics_port=args.metrics_port,
            slo_ttft_ms=args.slo_ttft_ms,
            slo_tpot_ms=args.slo_tpot_ms,
            autoscale=_autoscaling_spec(args, prefill, decode) if args.autoscale else None,
            targets_dir=args.autoscale_dir,
            prometheus_url=args.prometheus,
            scrape_interval=args.scrape_interval,
        )
    )


def _autoscaling_spec(args: argparse.Namespace, prefill: int, decode: int) -> Any:
    if args.colocated:
        raise CLIError("--autoscale scales prefill and decode pools; it does not apply to --colocated")
    try:
        from tandem_operator.autoscaling.policy import AutoscalingSpec
    except ImportError as e:
        raise CLIError(f"--autoscale needs the operator package (pip install -e operator): {e}") from None
    return AutoscalingSpec(
        ttft_ms=args.slo_ttft_ms,
        tpot_ms=args.slo_tpot_ms,
        attainment=args.attainment,
        prefill_min_replicas=prefill,
        prefill_max_replicas=max(prefill, args.max_prefill),
        decode_min_replicas=decode,
        decode_max_replicas=max(decode, args.max_decode),
        window_seconds=args.window,
        stabilization_seconds=args.stabilization,
        cooldown_seconds=args.cooldown,
        min_requests=args.min_requests,
        burst_horizon_seconds=args.burst_horizon,
    )


def _check_endpoint(endpoint: str, wait_s: float = 10.0) -> None:
    """Refuse to replay against an endpoint that cannot answer: every request would fail, each
    after waiting for a connection. One that is up but not ready (its workers still starting) gets
    `wait_s` to become ready; one without gRPC health checking is taken as it is."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + wait_s
    with grpc.insecure_channel(endpoint) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                r = health.Check(health_pb2.HealthCheckRequest(), timeout=max(1.0, wait_s))
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return
                raise CLIError(f"{endpoint}: cannot reach it: {e.code().name}: {e.details()}") from None
            if r.status == health_pb2.HealthCheckResponse.SERVING:
                return
            if time.monotonic() >= deadline:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
                raise CLIError(f"{endpoint}: not ready after {wait_s:.0f} s (health: {status})")
            time.sleep(0.5)


def _cmd_bench(args: argparse.Namespace) -> int:
    import grpc

    from .server.replay import load_trace, replay

    trace = load_trace(args.trace, max_requests=args.max_requests)
    _check_endpoint(args.endpoint)
    try:
        report = replay(
            args.endpoint,
            trace,
            time_scale=args.time_scale,
            max_requests=args.max_requests,
            slo_ttft_s=args.slo_ttft_ms / 1000.0,
            slo_tpot_s=args.slo_tpot_ms / 1000.0,
        )
    except grpc.RpcError as e:
        raise CLIError(f"{args.endpoint}: {e.code().name}: {e.details()}") from None
    if not args.json and "AzureLLMInferenceTrace" in args.trace:
        # CC-BY asks for the paper that came with the trace: 2024's files are the "_1week" ones.
        paper = (
            "Stojkovic et al., DynamoLLM, arXiv:2408.00741"
            if "_1week" in args.trace
            else "Patel et al., Splitwise, ISCA 2024"
        )
        print(f"trace: Azure LLM inference trace (CC-BY 4.0); {paper}")
    print(json.dumps(report.to_dict()) if args.json else report.table(), flush=True)
    if reason := report.total_failure():
        # A script running the bench must not read a replay that measured nothing as a pass.
        print(f"tandem: error: {reason}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "worker":
            return _cmd_worker(args)
        if args.command == "router":
            return _cmd_router(args)
        if args.command == "up":
            return _cmd_up(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "demo":
            from .server.demo import demo

            return demo(args.model, args.max_tokens)
        if args.command == "operator":
            try:
                from tandem_operator.main import run as run_operator
            except ImportError as e:
                raise CLIError(f"the operator is not installed (pip install -e operator): {e}") from None
            return run_operator(args)
    except CLIError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError, TimeoutError, RuntimeError) as e:
        # RequestError (a ValueError) and unknown models land here: the message names the field/path.
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
