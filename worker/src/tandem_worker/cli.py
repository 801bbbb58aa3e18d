"""The `tandem` command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
)


class CLIError(Exception):
    """An error the user can fix; printed without a traceback."""


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--seed", type=int, default=None, help="per-request seed: same seed, same output")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", action="store_true", help="report each generated token's log-probability")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem: disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text offline with the built-in engine")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="JSON lines: {'prompt': ..., optional sampling fields}")
    g.add_argument("--model", default="smollm2-135m", help="built-in name, GGUF file or HF folder")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt, in input order")
    g.add_argument("--device", default="cpu")
    g.add_argument("--kv-cache-bytes", type=int, default=None, help="KV cache budget in bytes")
    _add_sampling_args(g)
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
                    unknown = set(item) - {"prompt", "chat", *SAMPLING_FIELDS}
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


def _cmd_generate(args: argparse.Namespace) -> int:
    items = _read_prompts(args)
    from .engine.sampling_params import SamplingParams
    from .llm import LLM, ChatPrompt

    defaults = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
        "logprobs": args.logprobs,
    }
    params = []
    for i, item in enumerate(items):
        fields = {**defaults, **{k: v for k, v in item.items() if k in SAMPLING_FIELDS}}
        try:
            params.append(SamplingParams(**fields))
        except (ValueError, TypeError) as e:
            raise CLIError(f"prompt {i}: {e}") from None
    kwargs: dict[str, Any] = {"device": args.device}
    if args.kv_cache_bytes is not None:
        kwargs["kv_cache_bytes"] = args.kv_cache_bytes
    llm = LLM(args.model, **kwargs)
    prompts = [
        ChatPrompt([{"role": "user", "content": it["prompt"]}]) if it.get("chat", args.chat) else it["prompt"]
        for it in items
    ]
    outputs = llm.generate(prompts, params)
    for item, out in zip(items, outputs):
        if args.json:
            record = {
                "prompt": item["prompt"],
                "prompt_token_ids": out.prompt_token_ids,
                "token_ids": out.token_ids,
                "text": out.text,
                "finish_reason": out.finish_reason,
                "num_cached_tokens": out.num_cached_tokens,
            }
            if out.logprobs is not None:
                record["logprobs"] = out.logprobs
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            print(f"--- {item['prompt']!r}\n{out.text}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _cmd_generate(args)
    except CLIError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        # RequestError (a ValueError) and unknown models land here: the message names the field/path.
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
