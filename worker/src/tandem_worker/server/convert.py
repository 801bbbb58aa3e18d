"""Conversions between the wire messages and the engine's types, and gRPC status mapping."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine.loader import checkpoint_files
from ..engine.sampling_params import SamplingParams, StructuredOutputs
from ..engine.sequence import FinishReason
from .pb import inference_pb2 as pb
from .pb import worker_pb2 as wpb

if TYPE_CHECKING:  # the router imports this module and never the engine (nor torch)
    from ..engine.llm_engine import LLMEngine
    from ..engine.sampler import TopLogprobs

DEFAULT_MAX_TOKENS = 16

FINISH_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP.value: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH.value: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT.value: pb.FINISH_REASON_ABORT,
}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}


def params_from_pb(s: pb.SamplingParams, *, max_tokens: int | None = None) -> SamplingParams:
    """Unset optional fields take the engine's defaults. Raises RequestError on bad values."""
    return SamplingParams(
        max_tokens=max_tokens
        if max_tokens is not None
        else (s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS),
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k if s.HasField("top_k") else 0,
        seed=s.seed if s.HasField("seed") else None,
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
        fit_max_tokens=s.fit_max_tokens,
        presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else 0.0,
        frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else 0.0,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        min_p=s.min_p if s.HasField("min_p") else 0.0,
        logit_bias=dict(s.logit_bias),
        # A prefill worker samples the first token alone (max_tokens 1): the ban holds for it if
        # min_tokens reaches past it.
        min_tokens=s.min_tokens if max_tokens is None else min(s.min_tokens, max_tokens),
        prompt_logprobs=s.prompt_logprobs if s.HasField("prompt_logprobs") else None,
        structured_outputs=structured_from_pb(s.structured_outputs)
        if s.HasField("structured_outputs")
        else None,
    )


def structured_from_pb(msg: pb.StructuredOutputs) -> StructuredOutputs:
    """Raises RequestError when no kind is set (or a value is bad)."""
    kind = msg.WhichOneof("kind")
    if kind == "choice":
        return StructuredOutputs(choice=tuple(msg.choice.values))
    return StructuredOutputs(**({kind: getattr(msg, kind)} if kind else {}))


def structured_to_pb(so: StructuredOutputs) -> pb.StructuredOutputs:
    if so.choice is not None:
        return pb.StructuredOutputs(choice=pb.StructuredOutputs.Choices(values=so.choice))
    return pb.StructuredOutputs(**{so.kind: getattr(so, so.kind)})


def params_to_pb(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        stop=p.stop,
        stop_token_ids=p.stop_token_ids,
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs,
        fit_max_tokens=p.fit_max_tokens,
    )
    if p.seed is not None:
        msg.seed = p.seed
    # Only where set: a worker of an older build, which knows none of these, then sees no field it
    # would drop in silence for any request without them.
    if p.presence_penalty:
        msg.presence_penalty = p.presence_penalty
    if p.frequency_penalty:
        msg.frequency_penalty = p.frequency_penalty
    if p.repetition_penalty != 1.0:
        msg.repetition_penalty = p.repetition_penalty
    if p.min_p:
        msg.min_p = p.min_p
    msg.logit_bias.update(p.logit_bias)
    msg.min_tokens = p.min_tokens
    if p.structured_outputs is not None:
        msg.structured_outputs.CopyFrom(structured_to_pb(p.structured_outputs))
    if p.prompt_logprobs is not None:
        msg.prompt_logprobs = p.prompt_logprobs
    return msg


def top_logprobs_to_pb(top: TopLogprobs) -> pb.TopLogprobs:
    return pb.TopLogprobs(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])


def top_logprobs_from_pb(msg: pb.TopLogprobs) -> TopLogprobs:
    return list(zip(msg.token_ids, msg.logprobs))


def prompt_logprobs_to_pb(logprobs: list[float | None], top: list[TopLogprobs] | None) -> pb.PromptLogprobs:
    """The engine's lists (None, then one per prompt token after the first) on the wire, which
    leaves out the first token's None."""
    msg = pb.PromptLogprobs(logprobs=logprobs[1:])
    if top is not None:
        msg.top_logprobs.extend(top_logprobs_to_pb(t) for t in top[1:])
    return msg


def prompt_logprobs_from_pb(msg: pb.PromptLogprobs) -> tuple[list[float | None], list[TopLogprobs]]:
    """As the engine keeps them: None for the first prompt token, then one per token."""
    top = [top_logprobs_from_pb(t) for t in msg.top_logprobs] or [[] for _ in msg.logprobs]
    return [None, *msg.logprobs], [[], *top]


# Bytes read from the start, middle and end of each tensor for the model id.
_ID_SAMPLE = 4096


def model_id(folder: Path) -> str:
    """Identity of a model's weights: its config, the safetensors headers, and a few KiB from the
    start, middle and end of every tensor.

    Cheap (about 12 KiB a tensor, not the whole checkpoint) and different for different weights
    of the same shape: a fine-tune changes a tensor's bytes throughout, so a prefill worker serving
    other weights is refused at the handshake and never paired by the router. (The first MiB of
    each file, as before, missed every tensor after the embeddings.) The folder's name is not part
    of it: the same weights under two names are the same model.
    """
    h = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    h.update(json.dumps(config, sort_keys=True).encode())
    for f in checkpoint_files(folder):
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = fh.read(header_len)
            h.update(header)
            tensors = json.loads(header)
            for name in sorted(k for k in tensors if k != "__metadata__"):
                start, end = tensors[name]["data_offsets"]
                size = end - start
                for at in sorted({0, max(0, size // 2 - _ID_SAMPLE // 2), max(0, size - _ID_SAMPLE)}):
                    fh.seek(8 + header_len + start + at)
                    h.update(fh.read(min(_ID_SAMPLE, size - at)))
    return f"{config.get('model_type', 'model')}@{h.hexdigest()[:16]}"


def kv_layout(engine: LLMEngine, mid: str) -> wpb.KVLayout:
    layout = engine.runner.layout
    return wpb.KVLayout(
        model_id=mid,
        dtype=str(layout.dtype).removeprefix("torch."),
        block_size=layout.block_size,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
    )
