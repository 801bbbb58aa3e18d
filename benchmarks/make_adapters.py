"""Make LoRA adapters in PEFT's format for a base model, with `peft` itself, for tests and benchmarks.

Each adapter is written by `PeftModel.save_pretrained` (adapter_config.json +
adapter_model.safetensors), so Tandem reads exactly what a user's fine-tuning run produces. The
weights are random but scaled so that an adapter visibly changes the base model's greedy output
without turning it into noise: A ~ N(0, 1/hidden_in), B ~ N(0, b_std^2).

    python benchmarks/make_adapters.py OUT_DIR --count 200 [--model smollm2-135m]

`make_adapters(...)` is the library form used by the tests.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Target sets seen in practice: PEFT's default for Llama (q, v), attention only, MLP only, everything.
TARGET_SETS = (
    ("q_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("gate_proj", "up_proj", "down_proj"),
    ALL_MODULES,
)


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    target_modules: tuple[str, ...]
    alpha: float = 16.0
    seed: int = 0
    use_rslora: bool = False
    b_std: float = 0.02
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


def mixed_specs(
    count: int, ranks: Iterable[int] = (8, 16, 32, 64), seed: int = 0, b_std: float = 0.02
) -> list[AdapterSpec]:
    """`count` adapters cycling through ranks and target sets (S-LoRA's mixed-rank setup)."""
    ranks = list(ranks)
    rng = random.Random(seed)
    return [
        AdapterSpec(
            name=f"adapter-{i:04d}",
            rank=ranks[i % len(ranks)],
            target_modules=TARGET_SETS[rng.randrange(len(TARGET_SETS))],
            alpha=float(2 * ranks[i % len(ranks)]),
            seed=seed * 100_003 + i,
            b_std=b_std,
        )
        for i in range(count)
    ]


def make_adapters(base_model_dir: Path, out_dir: Path, specs: list[AdapterSpec]) -> dict[str, Path]:
    """Write each adapter to out_dir/<name>/ and return name -> folder. Existing folders are reused."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    paths = {s.name: out_dir / s.name for s in specs}
    todo = [s for s in specs if not (paths[s.name] / "adapter_model.safetensors").exists()]
    if not todo:
        return paths
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    # Adapters with the same LoraConfig share one PEFT model: only their weights differ, and
    # injecting the LoRA layers is the slow part (hundreds of adapters take seconds, not minutes).
    groups: dict[tuple, list[AdapterSpec]] = {}
    for spec in todo:
        key = (
            spec.rank,
            spec.alpha,
            spec.target_modules,
            spec.use_rslora,
            tuple(sorted(spec.rank_pattern.items())),
            tuple(spec.alpha_pattern.items()),  # in order: PEFT takes the first key that matches
        )
        groups.setdefault(key, []).append(spec)
    for group in groups.values():
        first = group[0]
        cfg = LoraConfig(
            r=first.rank,
            lora_alpha=first.alpha,
            target_modules=list(first.target_modules),
            use_rslora=first.use_rslora,
            rank_pattern=dict(first.rank_pattern),
            alpha_pattern=dict(first.alpha_pattern),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        )
        model = get_peft_model(base, cfg)
        for spec in group:
            gen = torch.Generator().manual_seed(spec.seed)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_A" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
                    elif "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * spec.b_std)
            model.save_pretrained(paths[spec.name])
        base = model.unload()  # strip the LoRA layers: the next group starts from the clean base
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m", help="built-in name, HF folder or GGUF file")
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from tandem_worker.engine.loader import resolve_model

    specs = mixed_specs(args.count, [int(r) for r in args.ranks.split(",")], args.seed)
    paths = make_adapters(resolve_model(args.model), args.out_dir, specs)
    print(f"{len(paths)} adapters in {args.out_dir}")


if __name__ == "__main__":
    main()
