"""Typed configuration: what the model is (`ModelConfig`) and how the engine runs it (`EngineConfig`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """The decoder's shape, read from a Hugging Face `config.json`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2 has biases on q/k/v
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    # Mistral's (and Qwen2's, when use_sliding_window) attention over the last N positions only.
    # The engine's attention is full-causal, which equals it for contexts of at most N tokens.
    sliding_window: int | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; Tandem serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        # rope_theta moved into rope_parameters in newer transformers configs.
        rope_params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_theta = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        scaling = None
        rope_type = rope_params.get("rope_type") or rope_params.get("type")
        if rope_type == "llama3":
            try:
                scaling = RopeScaling(
                    factor=float(rope_params["factor"]),
                    low_freq_factor=float(rope_params["low_freq_factor"]),
                    high_freq_factor=float(rope_params["high_freq_factor"]),
                    original_max_position_embeddings=int(rope_params["original_max_position_embeddings"]),
                )
            except KeyError as e:
                raise ValueError(f"llama3 rope scaling lacks {e.args[0]!r}") from None
        elif rope_type not in (None, "default"):
            raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: default, llama3")
        # The MLP is SwiGLU: another activation would be served as SiLU, with other outputs.
        act = cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {act!r}; Tandem's MLP is SwiGLU (silu)")
        eos = cfg.get("eos_token_id")
        window = cfg.get("sliding_window")
        if cfg.get("use_sliding_window") is False:  # Qwen2 lists a window it does not use
            window = None
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            bos_token_id=cfg.get("bos_token_id"),
            sliding_window=int(window) if window else None,
        )

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model folder {folder} has no config.json")
        config = cls.from_dict(json.loads(path.read_text()))
        # Chat models may end a turn with a token only generation_config.json lists (Llama 3's
        # <|eot_id|>): transformers' generate stops at both lists, and so must the engine and router.
        generation = Path(folder) / "generation_config.json"
        if generation.is_file():
            eos = json.loads(generation.read_text()).get("eos_token_id")
            extra = eos if isinstance(eos, list) else [eos] if eos is not None else []
            ids = config.eos_token_ids + tuple(int(e) for e in extra if int(e) not in config.eos_token_ids)
            config = replace(config, eos_token_ids=ids)
        return config

    @property
    def context_limit(self) -> int:
        """The longest context the engine computes as the model does: its positions, and no more
        than its sliding window (beyond which full-causal attention would differ)."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    def kv_bytes_per_token(self, dtype_size: int) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_size


@dataclass
class EngineConfig:
    """How the engine runs: device, dtype, KV memory budget and batching limits."""

    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    block_size: int = 16
    # The KV budget: an absolute number of bytes wins over a fraction of free memory.
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.3
    max_num_batched_tokens: int = 2048  # token budget of one scheduler step
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    # False on workers behind a router: it detokenizes and applies stop strings itself.
    detokenize: bool = True
    seed: int = 0  # dummy weights and anything else drawn at start-up: the same in every worker
    # The stream requests without a seed draw from. None: a random one per engine, so replicas (and
    # a worker after a restart) do not all sample alike; set it to replay a worker's draws.
    sampling_seed: int | None = None
    # "safetensors": the model folder's checkpoint; "dummy": random weights of the model's shape,
    # drawn on the device (benchmarks of large shapes with no download).
    load_format: str = "safetensors"
    # CUDA: decode-only steps of up to this many sequences replay captured CUDA graphs (one per
    # captured batch size, padded up to the next); 0 runs every step eagerly.
    cuda_graph_max_batch: int = 256
    # Decode steps with adapters replay graphs too (captured at start-up with a lora_store, else at
    # a batch size's first such step) when every adapter's rank is at most this; larger ones, or
    # 0, run those steps eagerly.
    cuda_graph_max_lora_rank: int = 64
    # Those graphs fold the LoRA shrink into the base GEMMs (lora_fold.py) for batches whose adapters
    # fit together in this many extra weight rows per projection part (their ranks summed): one
    # GEMM and one expand launch per projection instead of a GEMM, a shrink and an expand. The
    # rows cost memory (Llama-3-8B at 64: about 160 MB) and their bytes in every such GEMM. 0: off.
    cuda_graph_lora_fold_rank: int = 0
    # LoRA: the adapter store (a folder of PEFT adapters, one sub-folder per name), the host-memory
    # cache above it, and how long a request may wait for its adapter to load. Device memory for
    # adapters comes out of the KV cache budget (unified paging).
    lora_store: str | None = None
    lora_host_cache_bytes: int = 2 * 2**30
    lora_load_timeout_s: float = 30.0
    # How often (seconds, per adapter, while requests want it) a resident adapter's files are
    # checked for a replacement, which is then read and swapped in (LoRAManager); 0: every request.
    lora_files_check_interval_s: float = 2.0
    # Prefill worker: KV computed for a request but not yet sent to its decode worker, in bytes.
    # Above the first, that request's next prompt chunk waits for its reader to catch up (a slow
    # reader then costs about this plus one chunk's KV of host memory); above the second, for all
    # requests together, new KV pulls are refused as busy (the router tries another prefill worker).
    # A reader as fast as the engine stays far below both (about one layer's piece of a chunk).
    kv_send_backlog_bytes: int = 64 * 2**20
    kv_send_backlog_total_bytes: int = 4 * 2**30
    # Free KV blocks an admission leaves for each sequence already holding KV (Scheduler.watermark):
    # the blocks running decodes take next. 0 admits up to the last block (more preemption and
    # recompute on CPU; on a GPU, where a recompute is cheap next to a decode step, 0 may be the
    # better choice: to be measured there).
    admission_watermark_blocks_per_seq: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def _check_device(self) -> None:
        """A clear error for a device this machine lacks (torch's is an assertion deep inside)."""
        import torch

        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(
                f"device {self.device!r} is not a device name (cpu, cuda, cuda:1): {e}"
            ) from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(
                    f"device {self.device!r}: no CUDA device is available here "
                    f"(torch {torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'})"
                )
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(
                    f"device {self.device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
                )
        elif device.type != "cpu":
            raise ValueError(f"device {self.device!r}: Tandem runs on cpu or cuda")

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")
        if self.lora_load_timeout_s <= 0:
            raise ValueError("lora_load_timeout_s must be positive")
        if not self.lora_files_check_interval_s >= 0:  # also NaN
            raise ValueError("lora_files_check_interval_s must be >= 0")
        if self.kv_send_backlog_bytes < 1 or self.kv_send_backlog_total_bytes < 1:
            raise ValueError("kv_send_backlog_bytes and kv_send_backlog_total_bytes must be positive")
        if self.admission_watermark_blocks_per_seq < 0:
            raise ValueError("admission_watermark_blocks_per_seq must be >= 0 (0: no watermark)")
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {self.load_format!r}")
        if self.cuda_graph_max_batch < 0:
            raise ValueError("cuda_graph_max_batch must be >= 0 (0 disables CUDA graphs)")
        if self.cuda_graph_max_lora_rank < 0:
            raise ValueError("cuda_graph_max_lora_rank must be >= 0 (0: LoRA decode steps run eagerly)")
        if self.cuda_graph_lora_fold_rank < 0:
            raise ValueError("cuda_graph_lora_fold_rank must be >= 0 (0: no folding)")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            # 0 was taken as "unset" (the model's whole context), a negative one failed in torch.
            raise ValueError(
                "max_model_len must be at least 2 (a prompt token and one to generate), "
                f"got {self.max_model_len}"
            )
        self._check_device()
        if self.max_num_seqs > self.max_num_batched_tokens:
            # Otherwise running decodes beyond the token budget would wait for older ones to finish.
            self.max_num_seqs = self.max_num_batched_tokens
