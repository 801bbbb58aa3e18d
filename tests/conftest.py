"""Shared, session-scoped fixtures: the built-in model converted once, and transformers' view of it."""

from __future__ import annotations

import os
from pathlib import Path

# Triton reads this when its functions are decorated, i.e. on first import, which may come from any
# test module: set it before anything imports triton, so kernels run in the interpreter on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# As `make` sets it: the model's conversion and the C++ ops' build are reused across runs, and
# the workers the serving tests start (children inherit the environment) find both.
os.environ.setdefault("TANDEM_CACHE_DIR", str(REPO_ROOT / ".cache" / "models"))


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """$TANDEM_CACHE_DIR (by default the repo's git-ignored .cache/models): runs reuse the conversion."""
    return Path(os.environ["TANDEM_CACHE_DIR"])


@pytest.fixture(scope="session")
def model_dir(model_cache_dir: Path) -> Path:
    """The built-in smollm2-135m as a Hugging Face folder (converted from GGUF on first use)."""
    from tandem_worker.engine.loader import resolve_model

    return resolve_model("smollm2-135m", cache_dir=model_cache_dir)


@pytest.fixture(scope="session")
def hf_model(model_dir: Path):
    """transformers' float32 model loaded from `model_dir`: the reference the engine is checked against."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
