"""`ModelRunner`: owns the weights and the KV cache tensor; turns a scheduler step into logits."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import tandem_kernels

from .block_manager import cache_slot, cache_slots
from .config import EngineConfig, ModelConfig
from .cuda_graphs import DecodeGraphs
from .host_allocator import keep_freed_memory
from .lora_fold import FoldedWeights, fold_layers
from .model import AttentionMetadata, LlamaModel, PromptRows, RotaryEmbedding
from .scheduler import SchedulerOutput
from .sequence import Sequence

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(cfg: EngineConfig) -> torch.dtype:
    if cfg.dtype is None:
        return torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    return DTYPES[cfg.dtype]


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass(frozen=True)
class KVCacheLayout:
    num_blocks: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def shape(self) -> tuple[int, ...]:
        return (2, self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)


def plan_kv_cache(
    model_cfg: ModelConfig, cfg: EngineConfig, dtype: torch.dtype, device: torch.device
) -> KVCacheLayout:
    """Size the block pool from the memory budget: bytes if given, else a fraction of free memory."""
    probe = KVCacheLayout(
        1,
        cfg.block_size,
        model_cfg.num_hidden_layers,
        model_cfg.num_key_value_heads,
        model_cfg.head_dim,
        dtype,
    )
    if cfg.kv_cache_bytes is not None:
        budget = cfg.kv_cache_bytes
        source = f"kv_cache_bytes={budget}"
        free = available_memory_bytes(device)
        if budget > free:
            # Else torch's allocator error, or (on a host that overcommits) the OOM killer later.
            raise ValueError(
                f"kv_cache_bytes={budget} ({budget / 2**30:.1f} GiB) is more than the "
                f"{free / 2**30:.1f} GiB free on {device} after loading the model; lower it"
            )
    else:
        free = available_memory_bytes(device)
        budget = int(free * cfg.kv_cache_memory_fraction)
        source = f"{cfg.kv_cache_memory_fraction:.0%} of {free / 2**30:.1f} GiB free"
    num_blocks = budget // probe.block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"KV cache budget ({source}) is smaller than one block ({probe.block_bytes} bytes); raise it"
        )
    return KVCacheLayout(
        num_blocks, cfg.block_size, probe.num_layers, probe.num_kv_heads, probe.head_dim, dtype
    )


class ModelRunner:
    def __init__(
        self, model_cfg: ModelConfig, model_dir: Path, cfg: EngineConfig, max_model_len: int
    ) -> None:
        self.device = torch.device(cfg.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.dtype = resolve_dtype(cfg)
        self.block_size = cfg.block_size
        with torch.device("meta"):
            model = LlamaModel(model_cfg, max_model_len)
        # Materialise on the target device, in the serving dtype, without a throwaway random init:
        # an 8B model never exists in float32 (32 GB) on the way to bf16.
        model = model.to_empty(device=self.device).to(self.dtype).eval()
        model.tie_weights()
        if cfg.load_format == "dummy":
            model.init_dummy_weights(cfg.seed)
        else:
            model.load_weights(model_dir)
        model.tie_weights()
        # The RoPE table is not in the checkpoint and stays float32 whatever the weights' dtype.
        model.rotary = RotaryEmbedding(model_cfg, max_model_len).to(self.device)
        # Before the KV cache is sized from free memory: the freed dense weights (and a tied
        # lm_head's packed copy, which keeps its dense one) are then accounted for.
        model.prepack()
        self.model = model
        use_graphs = self.device.type == "cuda" and tandem_kernels.uses_triton(self.device)
        use_graphs = use_graphs and cfg.cuda_graph_max_batch > 0
        # Folded LoRA graphs' weights (lora_fold.py): moved now, before the KV cache takes its share
        # of free memory and before the base graphs capture the weights' storage.
        self.folded: FoldedWeights | None = None
        if use_graphs and cfg.cuda_graph_max_lora_rank > 0 and cfg.cuda_graph_lora_fold_rank > 0:
            self.folded = fold_layers(model.layers, cfg.cuda_graph_lora_fold_rank)
            # The weights' old buffers sit freed in torch's cache, which the driver's free memory
            # (the KV budget's measure) does not count: hand them back, or the KV cache loses
            # nearly the projections' size for them.
            torch.cuda.empty_cache()
        self.layout = plan_kv_cache(model_cfg, cfg, self.dtype, self.device)
        # Off CUDA (and unless Triton is forced) attention gathers each sequence's exact context.
        self.gather_attention = self.device.type != "cuda" and os.environ.get("TANDEM_KERNELS") != "triton"
        # With the C++ CPU ops, decodes attend in place over their pages; without, in gathered buckets.
        self.paged_decodes = self.gather_attention and tandem_kernels.cpu_ops_serve(self.dtype)
        self.kv_cache = torch.zeros(self.layout.shape, dtype=self.dtype, device=self.device)
        self.lora = None  # the engine's LoRAManager: adapters live in this KV pool
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            # Captured against this kv_cache tensor: it must never be reallocated.
            max_batch = min(cfg.cuda_graph_max_batch, cfg.max_num_seqs)
            max_blocks = -(-max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, self.kv_cache, max_batch, max_blocks)
            self.graphs.capture()
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB)",
            self.layout.num_blocks,
            self.block_size,
            self.layout.num_blocks * self.layout.block_bytes / 2**20,
        )

    def _tensor(self, data: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _block_tables(self, tables: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in tables)
        return self._tensor([t + [0] * (width - len(t)) for t in tables], torch.int32)

    def prepare(
        self, out: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Pack a step's chunks, decodes first, and return (input_ids, positions, metadata, order).

        The metadata carries the step's LoRA work (`meta.lora`) when any chunk uses an adapter.

        `order[j]` is the index in `out.chunks` of the j-th packed chunk.
        """
        bs = self.block_size
        decodes = [i for i, c in enumerate(out.chunks) if c.num_tokens == 1]
        prefills = [i for i, c in enumerate(out.chunks) if c.num_tokens > 1]
        order = decodes + prefills
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        for i in order:
            c = out.chunks[i]
            table = c.seq.block_table
            ids += c.seq.tokens(c.start, c.start + c.num_tokens)
            pos += range(c.start, c.start + c.num_tokens)
            slots += cache_slots(table, c.start, c.start + c.num_tokens, bs)
        meta = AttentionMetadata(
            num_decode_tokens=len(decodes),
            slot_mapping=self._tensor(slots),
            decode_block_tables=None,
            decode_context_lens=None,
            prefill_block_tables=None,
            prefill_cu_seqlens_q=None,
            prefill_context_lens=None,
        )
        if decodes:
            chunks = [out.chunks[i] for i in decodes]
            meta.decode_block_tables = self._block_tables([c.seq.block_table for c in chunks])
            meta.decode_context_lens = self._tensor([c.start + 1 for c in chunks], torch.int32)
        if prefills:
            chunks = [out.chunks[i] for i in prefills]
            meta.prefill_block_tables = self._block_tables([c.seq.block_table for c in chunks])
            cu = [0]
            for c in chunks:
                cu.append(cu[-1] + c.num_tokens)
            meta.prefill_cu_seqlens_q = cu
            meta.prefill_context_lens = [c.start + c.num_tokens for c in chunks]
            meta.prefill_is_fresh = all(c.start == 0 for c in chunks)
        if self.gather_attention:
            self._add_gathered(meta, [out.chunks[i] for i in order])
        if self.lora is not None:
            packed = [out.chunks[i] for i in order]
            meta.lora = self.lora.batch([c.num_tokens for c in packed], [c.seq.lora_slot for c in packed])
        return self._tensor(ids), self._tensor(pos), meta, order

    def _add_gathered(self, meta: AttentionMetadata, chunks: list) -> None:
        """The CPU attention plan: decodes (first in `chunks`) paged or in buckets, the other
        chunks gathered after them. A step of decodes alone needs no gather (kv_blocks None)."""
        bs = self.block_size
        nd = meta.num_decode_tokens
        layout = self.layout
        if self.paged_decodes:
            if nd == len(chunks):
                return
        else:
            meta.decode_buckets = tandem_kernels.plan_decode_buckets(
                [c.seq.block_table for c in chunks[:nd]],
                [c.start + 1 for c in chunks[:nd]],
                bs,
                position_bytes=layout.block_bytes // (layout.num_layers * bs),
            )
        blocks: list[int] = []
        cu_q, ctx_lens = [nd], []
        for c in chunks[nd:]:
            ctx = c.start + c.num_tokens
            blocks += c.seq.block_table[: -(-ctx // bs)]
            cu_q.append(cu_q[-1] + c.num_tokens)
            ctx_lens.append(ctx)
        meta.kv_blocks = self._tensor(blocks)
        meta.cu_seqlens_q, meta.context_lens = cu_q, ctx_lens

    def execute(
        self, out: SchedulerOutput, layer_hook: Callable[[int], None] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Run one step. Returns logits [k, vocab] for the chunks that complete their sequence,
        and the indices (into `out.chunks`) of those chunks, in row order."""
        if layer_hook is None and self.graphs is not None:
            logits = self._run_graph(out)
            if logits is not None:
                return logits, list(range(len(out.chunks)))
        input_ids, positions, meta, order = self.prepare(out)
        logit_rows: list[int] = []
        sampled_chunks: list[int] = []
        offset = 0
        prompt: list[tuple[Sequence, int, int]] = []  # (seq, first packed row, rows) of prompt logprobs
        for i in order:
            c = out.chunks[i]
            seq = c.seq
            if seq.params.prompt_logprobs is not None:
                # Positions whose next prompt token has no log-probability yet (a recomputed
                # chunk, after a preemption, has its already).
                lo = len(seq.prompt_logprobs) - 1
                hi = min(c.start + c.num_tokens, seq.num_prompt_tokens - 1)
                if c.start <= lo < hi:
                    prompt.append((seq, offset + lo - c.start, hi - lo))
            offset += c.num_tokens
            if c.completes:
                logit_rows.append(offset - 1)
                sampled_chunks.append(i)
        rows = None
        if prompt:
            k = max(seq.params.prompt_logprobs or 0 for seq, _, _ in prompt)
            indices = [r for _, first, n in prompt for r in range(first, first + n)]
            targets = [
                t
                for seq, first, n in prompt
                for t in seq.prompt_token_ids[len(seq.prompt_logprobs) : len(seq.prompt_logprobs) + n]
            ]
            rows = PromptRows(self._tensor(indices), self._tensor(targets), k)
        logits = self.model(
            input_ids, positions, self.kv_cache, meta, self._tensor(logit_rows), layer_hook, prompt_rows=rows
        )
        if rows is not None:
            _record_prompt_logprobs(prompt, rows)
        return logits, sampled_chunks

    def _run_graph(self, out: SchedulerOutput) -> torch.Tensor | None:
        """Logits of a decode-only step replayed from a CUDA graph; None if the step does not
        qualify (it then runs eagerly): a prefill chunk, too many sequences or blocks, or an
        adapter of a larger rank than the LoRA graphs serve."""
        chunks = out.chunks
        graphs = self.graphs
        if not chunks:
            return None
        # One pass over the batch (this is host time the GPU waits on, per sequence per step).
        bs = self.block_size
        ids, pos, slots, tables = [], [], [], []
        with_lora = False
        for c in chunks:
            seq, p = c.seq, c.start
            if c.num_tokens != 1 or p + 1 != seq.num_tokens:
                return None  # a prefill chunk, or one that samples nothing
            table = seq.block_table
            ids.append(seq.token_at(p))
            pos.append(p)
            slots.append(cache_slot(table, p, bs))
            tables.append(table)
            with_lora = with_lora or seq.lora_slot is not None
        lora_slots = None
        if with_lora and self.lora is not None:
            lora_slots = [c.seq.lora_slot for c in chunks]
            if not graphs.lora_fits(lora_slots):
                return None
        if not graphs.fits(len(chunks), max(map(len, tables))):
            return None
        return graphs.run(ids, pos, slots, tables, lora_slots)


def _record_prompt_logprobs(prompt: list[tuple[Sequence, int, int]], rows: PromptRows) -> None:
    """Append each sequence's new prompt log-probabilities (and its own top k of the batch's k)."""
    assert rows.logprobs is not None
    logprobs = rows.logprobs.tolist()
    values = rows.top_values.tolist() if rows.top_values is not None else None
    ids = rows.top_ids.tolist() if rows.top_ids is not None else None
    at = 0
    for seq, _, n in prompt:
        k = seq.params.prompt_logprobs or 0
        seq.prompt_logprobs.extend(logprobs[at : at + n])
        for r in range(at, at + n):
            top = list(zip(ids[r][:k], values[r][:k])) if k and ids is not None and values is not None else []
            seq.prompt_top_logprobs.append(top)
        at += n
