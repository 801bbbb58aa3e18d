"""KServe Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`) in front of the router.

Calls: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
RepositoryIndex, ModelInfer and ModelStreamInfer (the bidirectional stream that Triton's clients use
for decoupled token streaming); the rest answer UNIMPLEMENTED. The messages and servicer base are
the ones `tritonclient[grpc]` ships (`tritonclient.grpc.service_pb2`), so no `.proto` is copied here.

Models: the base model under its served name, and each LoRA adapter under its own name (a request
for `model_name: "<adapter>"` runs that adapter).

Tensors, named as Triton's LLM backends (vLLM and TensorRT-LLM) name them:

* in: `text_input` (BYTES, one element, required); `stream` (BOOL: with ModelStreamInfer, one
  response per text delta, the last one flagged `triton_final_response`); `sampling_parameters`
  (BYTES JSON, as the vLLM backend: max_tokens, temperature, top_p, top_k, seed, stop,
  stop_token_ids, ignore_eos, the penalties, min_p, logit_bias, min_tokens, structured_outputs or
  its older name guided_decoding); or the separate tensors `max_tokens`, `temperature`, `top_p`,
  `top_k`, `seed`/`random_seed`, `stop_words` (BYTES), `ignore_eos`, `beam_width` (1) (a seed of -1
  is none, as the vLLM backend reads it; see `request_seed`);
  `exclude_input_in_output` (BOOL, default true here: text_output is only the generated text; false
  prepends the prompt as the vLLM backend does by default); `return_finish_reason`,
  `return_num_input_tokens`, `return_num_output_tokens` (BOOL) add those outputs. A tensor of any
  other name is refused (INVALID_ARGUMENT, naming it), so a misspelt parameter is never ignored.
  The request's own `parameters` map takes the same sampling keys, one value each (`stop` one string,
  `stop_token_ids` one id), and the keys Triton's clients set: `timeout` (microseconds) bounds the
  request, `priority` is accepted (one priority here), a sequence (`sequence_id`) is refused; any
  other key is refused too. A key given in two places must have the same value in both.
* out: `text_output` (BYTES), and `finish_reason` (BYTES), `num_input_tokens`,
  `num_output_tokens` (UINT32) when asked for (by the return_* flags or the request's `outputs`).

Design choices: it is served on a gRPC server and port of its own (`--kserve-port`), because
(1) each call here makes a call to the router's `tandem.v1.Inference` port over loopback (the same
translation as the HTTP frontend, so validation, admission, retries, metrics, deadlines and
cancellation are the gRPC path's own): sharing one thread pool with the calls it makes could
deadlock under load; (2) Triton's and KServe's clients expect a gRPC port of its own (Triton 8001,
KServe 8081), which a Service and a NetworkPolicy can then expose separately. The server has its
own health service and reflection. Deadlines of the incoming call travel upstream; a cancelled
call or stream cancels every upstream call it started.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import grpc
import numpy as np

from ..engine.sampling_params import (
    SAMPLING_REQUEST_FIELDS,
    RequestError,
    StructuredOutputs,
    json_token_id,
    request_seed,
)
from . import metrics
from .convert import structured_to_pb
from .handoff import Handoffs, forward
from .listen import EXCLUSIVE_PORT_OPTIONS, listen
from .pb import inference_pb2 as pb
from .pb import inference_pb2_grpc as pbgrpc

try:
    from tritonclient.grpc import model_config_pb2 as mc
    from tritonclient.grpc import service_pb2 as kpb
    from tritonclient.grpc import service_pb2_grpc as kgrpc
except ImportError as e:  # pragma: no cover - the worker image ships it
    raise ImportError(
        f"the KServe v2 frontend needs the tritonclient package (pip install tritonclient): {e}"
    ) from e

log = logging.getLogger(__name__)

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
VERSION = "1"
FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}
NUMPY = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# name -> (datatype shown in the metadata, kind the value is read as)
INPUTS: dict[str, tuple[str, str]] = {
    "text_input": ("BYTES", "str"),
    "stream": ("BOOL", "bool"),
    "sampling_parameters": ("BYTES", "str"),
    "exclude_input_in_output": ("BOOL", "bool"),
    "max_tokens": ("INT32", "int"),
    "temperature": ("FP32", "float"),
    "top_p": ("FP32", "float"),
    "top_k": ("INT32", "int"),
    "seed": ("UINT64", "int"),
    "random_seed": ("UINT64", "int"),
    "stop_words": ("BYTES", "strs"),
    "ignore_eos": ("BOOL", "bool"),
    "presence_penalty": ("FP32", "float"),
    "frequency_penalty": ("FP32", "float"),
    "repetition_penalty": ("FP32", "float"),
    "beam_width": ("INT32", "int"),
    "return_finish_reason": ("BOOL", "bool"),
    "return_num_input_tokens": ("BOOL", "bool"),
    "return_num_output_tokens": ("BOOL", "bool"),
}
OUTPUTS = {
    "text_output": "BYTES",
    "finish_reason": "BYTES",
    "num_input_tokens": "UINT32",
    "num_output_tokens": "UINT32",
}
SAMPLING_KEYS = set(SAMPLING_REQUEST_FIELDS)
# Triton's vLLM backend's name for structured_outputs (vLLM's before it was renamed).
KEY_ALIASES = {"guided_decoding": "structured_outputs"}
# Keys the vLLM backend passes on that are accepted here only at their no-op values.
NOOP_KEYS = {
    "n": 1,
    "best_of": 1,
    "use_beam_search": False,
}
# The request's own `parameters` map (the protocol's, beside the tensors) takes the sampling keys
# above, one value each, and these ones Triton reserves and its clients set (tritonclient's
# `priority`, `timeout`, `sequence_id`... arguments): a key in neither is refused.
TRITON_PARAMETERS = {
    "triton_enable_empty_final_response",
    "priority",
    "timeout",
    "sequence_id",
    "sequence_start",
    "sequence_end",
}


# The sampling keys the protocol carries as float32 (pb.SamplingParams' float fields).
FLOAT_KEYS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")


class BadRequest(Exception):
    pass


def _bytes_elems(raw: bytes) -> list[bytes]:
    """BYTES tensor raw contents: each element is a 4-byte little-endian length and the bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise BadRequest("malformed BYTES tensor contents")
        n = int.from_bytes(raw[i : i + 4], "little")
        if i + 4 + n > len(raw):  # a cut element, never silently shortened
            raise BadRequest("malformed BYTES tensor contents: an element runs past the end")
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def _serialize_bytes(values: list[bytes]) -> bytes:
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


def read_inputs(request: kpb.ModelInferRequest) -> dict[str, list[Any]]:
    """Every input tensor as a flat list of Python values (str for BYTES)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    values: dict[str, list[Any]] = {}
    for i, t in enumerate(request.inputs):
        if t.name not in INPUTS:
            raise BadRequest(f"unknown input tensor {t.name!r}; this model takes {', '.join(INPUTS)}")
        if t.name in values:
            raise BadRequest(f"input {t.name!r} is given twice")
        want, kind = INPUTS[t.name]
        dt = t.datatype
        if want == "BYTES" and dt != "BYTES":
            raise BadRequest(f"input {t.name!r}: datatype must be BYTES, got {dt}")
        if want != "BYTES" and dt == "BYTES":
            raise BadRequest(f"input {t.name!r}: datatype must be {want}, got BYTES")
        if kind == "bool" and dt != "BOOL":
            # 2 or 0.5 is no answer to a yes/no question (Triton refuses such a datatype too).
            raise BadRequest(f"input {t.name!r}: datatype must be BOOL, got {dt}")
        if dt == "BYTES":
            elems = _bytes_elems(raw[i]) if raw else list(t.contents.bytes_contents)
            try:
                vals: list[Any] = [e.decode("utf-8") for e in elems]
            except UnicodeDecodeError:
                raise BadRequest(f"input {t.name!r}: not UTF-8 text") from None
        elif dt in NUMPY:
            if raw:
                dtype = np.dtype(NUMPY[dt]).newbyteorder("<")
                if len(raw[i]) % dtype.itemsize:
                    raise BadRequest(
                        f"input {t.name!r}: {len(raw[i])} bytes of raw contents are not whole {dt} elements"
                    )
                vals = np.frombuffer(raw[i], dtype=dtype).tolist()
            elif dt in CONTENTS:
                vals = list(getattr(t.contents, CONTENTS[dt]))
            else:  # FP16, BF16: the protocol has no typed contents for them, only raw bytes
                raise BadRequest(f"input {t.name!r}: datatype {dt} travels in raw_input_contents only")
        else:
            raise BadRequest(f"input {t.name!r}: datatype {dt!r} is not supported")
        if kind != "strs" and len(vals) != 1:
            raise BadRequest(f"input {t.name!r}: expected one element (batch size 1), got {len(vals)}")
        if any(d < 0 for d in t.shape) or math.prod(t.shape) != len(vals):
            raise BadRequest(
                f"input {t.name!r}: shape {list(t.shape)} does not hold its {len(vals)} element(s)"
            )
        values[t.name] = vals
    return values


class _Translated:
    def __init__(self, request: pb.GenerateRequest, stream: bool, prompt: str, outputs: list[str]) -> None:
        self.request, self.stream, self.prompt, self.outputs = request, stream, prompt, outputs
        self.exclude_input = True
        self.timeout: float | None = None  # seconds, from the request's `timeout` parameter


def _param_value(p: kpb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _is_off(value: Any, off: Any) -> bool:
    """Whether `value` is the no-op value `off` (numbers may come as numeric strings; a bool is
    never a number)."""
    try:
        return _as_bool(value) == off if isinstance(off, bool) else _as_float(value) == off
    except (ValueError, TypeError):
        return False


class KServeService(kgrpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        upstream: str,
        model_name: str,
        max_model_len: int,
        adapters: Callable[[], list[str]],
        ready: Callable[[], bool],
        version: str = "",
        handoffs: Handoffs | None = None,
    ) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.stub = pbgrpc.InferenceStub(self.channel)
        self.handoffs = handoffs  # the router's, when `upstream` is this process's router
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.adapters = adapters
        self.ready = ready
        self.version = version

    def close(self) -> None:
        self.channel.close()

    # --- health and metadata -----------------------------------------------------------------

    def _known(self, name: str) -> bool:
        return name == self.model_name or name in self.adapters()

    def _check_model(self, name: str, version: str, context: grpc.ServicerContext) -> None:
        if not self._known(name):
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not served here")
        if version not in ("", VERSION):
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"model {name!r} has no version {version!r} (only {VERSION})"
            )

    def ServerLive(self, request, context):  # noqa: N802
        return kpb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return kpb.ServerReadyResponse(ready=self.ready())

    def ModelReady(self, request, context):  # noqa: N802
        ok = self.ready() and self._known(request.name) and request.version in ("", VERSION)
        return kpb.ModelReadyResponse(ready=ok)

    def ServerMetadata(self, request, context):  # noqa: N802
        return kpb.ServerMetadataResponse(name="tandem", version=self.version, extensions=[])

    def ModelMetadata(self, request, context):  # noqa: N802
        self._check_model(request.name, request.version, context)
        return kpb.ModelMetadataResponse(
            name=request.name,
            versions=[VERSION],
            platform="tandem",
            inputs=[
                kpb.ModelMetadataResponse.TensorMetadata(name=n, datatype=dt, shape=[1])
                for n, (dt, _) in INPUTS.items()
            ],
            outputs=[
                kpb.ModelMetadataResponse.TensorMetadata(name=n, datatype=dt, shape=[-1])
                for n, dt in OUTPUTS.items()
            ],
        )

    def ModelConfig(self, request, context):  # noqa: N802
        """Enough of Triton's model configuration for tools that read it (perf_analyzer, genai-perf
        check `model_transaction_policy.decoupled` before streaming)."""
        self._check_model(request.name, request.version, context)
        types = {
            "BYTES": mc.TYPE_STRING,
            "BOOL": mc.TYPE_BOOL,
            "INT32": mc.TYPE_INT32,
            "UINT32": mc.TYPE_UINT32,
            "UINT64": mc.TYPE_UINT64,
            "FP32": mc.TYPE_FP32,
        }
        config = mc.ModelConfig(
            name=request.name,
            platform="tandem",
            backend="tandem",
            max_batch_size=0,
            input=[
                mc.ModelInput(name=n, data_type=types[dt], dims=[1], optional=n != "text_input")
                for n, (dt, _) in INPUTS.items()
            ],
            output=[mc.ModelOutput(name=n, data_type=types[dt], dims=[-1]) for n, dt in OUTPUTS.items()],
            model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        )
        return kpb.ModelConfigResponse(config=config)

    def RepositoryIndex(self, request, context):  # noqa: N802
        names = [self.model_name, *[a for a in self.adapters() if a != self.model_name]]
        state = "READY" if self.ready() else "UNAVAILABLE"
        return kpb.RepositoryIndexResponse(
            models=[
                kpb.RepositoryIndexResponse.ModelIndex(name=n, version=VERSION, state=state) for n in names
            ]
        )

    # --- inference ------------------------------------------------------------------------------

    def translate(self, request: kpb.ModelInferRequest) -> _Translated:
        """ModelInferRequest -> tandem.v1 GenerateRequest (raises BadRequest)."""
        v = read_inputs(request)
        if "text_input" not in v:
            raise BadRequest("input 'text_input' (BYTES) is required")
        prompt = v["text_input"][0]
        req = pb.GenerateRequest(
            # Our own id upstream (the response keeps the client's): clients' ids such as "1" are not
            # unique across clients, and the workers refuse a second request under an id in flight.
            request_id=uuid.uuid4().hex,
            text=prompt,
            adapter="" if request.model_name in ("", self.model_name) else request.model_name,
        )
        s = req.sampling
        # Each key once: the same key in two places (a tensor, sampling_parameters, the request's
        # parameters) must agree, else which one wins would be a guess.
        seen: dict[str, tuple[Any, str]] = {}
        timeout = self._parameters(request, s, seen)
        if "sampling_parameters" in v:
            try:
                sp = json.loads(v["sampling_parameters"][0] or "{}")
            except ValueError as e:
                raise BadRequest(f"sampling_parameters: not JSON: {e}") from None
            except RecursionError:
                raise BadRequest("sampling_parameters: not JSON: nested too deeply") from None
            if not isinstance(sp, dict):
                raise BadRequest("sampling_parameters: must be a JSON object")
            for key, value in sp.items():
                key = KEY_ALIASES.get(key, key)
                if key in NOOP_KEYS:
                    if not _is_off(value, NOOP_KEYS[key]):
                        raise BadRequest(f"sampling_parameters: {key}={value!r} is not supported")
                    continue
                if key not in SAMPLING_KEYS:
                    raise BadRequest(
                        f"sampling_parameters: unknown key {key!r}; "
                        f"supported: {', '.join(sorted(SAMPLING_KEYS))}"
                    )
                self._set(s, key, value, "sampling_parameters." + key, seen)
        for name, key in (
            ("max_tokens", "max_tokens"),
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("top_k", "top_k"),
            ("seed", "seed"),
            ("random_seed", "seed"),
            ("ignore_eos", "ignore_eos"),
            ("presence_penalty", "presence_penalty"),
            ("frequency_penalty", "frequency_penalty"),
            ("repetition_penalty", "repetition_penalty"),
        ):
            if name in v:
                self._set(s, key, v[name][0], name, seen)
        if "stop_words" in v:
            self._set(s, "stop", [w for w in v["stop_words"] if w], "stop_words", seen)
        if "beam_width" in v and v["beam_width"][0] != 1:
            raise BadRequest(f"beam_width: only 1 is supported, got {v['beam_width'][0]}")
        stream = bool(v.get("stream", [False])[0])
        outputs = ["text_output"]
        for flag, out in (
            ("return_finish_reason", "finish_reason"),
            ("return_num_input_tokens", "num_input_tokens"),
            ("return_num_output_tokens", "num_output_tokens"),
        ):
            if v.get(flag, [False])[0]:
                outputs.append(out)
        asked = [o.name for o in request.outputs]
        for name in asked:
            if name not in OUTPUTS:
                raise BadRequest(f"unknown output {name!r}; this model has {', '.join(OUTPUTS)}")
        if len(set(asked)) != len(asked):
            raise BadRequest(f"an output is asked for twice: {asked}")
        if asked:  # only what was asked for, in that order
            outputs = asked
        t = _Translated(req, stream, prompt, outputs)
        t.exclude_input = bool(v.get("exclude_input_in_output", [True])[0])
        t.timeout = timeout
        return t

    def _parameters(self, request: kpb.ModelInferRequest, s: pb.SamplingParams, seen: dict) -> float | None:
        """The request's `parameters` map into `s`; returns the `timeout` it sets, in seconds."""
        timeout = None
        for key in sorted(request.parameters):
            value = _param_value(request.parameters[key])
            where = f"parameters.{key}"
            if value is None:
                raise BadRequest(f"{where}: has no value")
            if key in SAMPLING_KEYS:
                if key == "stop_token_ids" and isinstance(value, int) and not isinstance(value, bool):
                    value = [value]  # a parameter holds one value; lists go in sampling_parameters
                elif key == "stop" and not isinstance(value, str):
                    raise BadRequest(f"{where}: bad value {value!r}")
                self._set(s, key, value, where, seen)
            elif key in NOOP_KEYS:
                if not _is_off(value, NOOP_KEYS[key]):
                    raise BadRequest(f"{where}: {value!r} is not supported")
            elif key == "timeout":
                # Triton's: microseconds, 0 for none; it becomes the upstream call's deadline.
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise BadRequest(f"{where}: must be microseconds >= 0, got {value!r}")
                timeout = value / 1e6 if value else None
            elif key == "sequence_id":
                if value not in (0, ""):
                    raise BadRequest(f"{where}: sequences (stateful models) are not supported")
            elif key in ("sequence_start", "sequence_end"):
                if value is not False:
                    raise BadRequest(f"{where}: sequences (stateful models) are not supported")
            elif key == "triton_enable_empty_final_response":
                if not isinstance(value, bool):
                    raise BadRequest(f"{where}: must be a bool, got {value!r}")
            elif key == "priority":
                # One priority for every request here: like Triton for a model without priority
                # levels, the value changes nothing (and nothing in the output).
                if isinstance(value, bool) or not isinstance(value, int):
                    raise BadRequest(f"{where}: must be an integer, got {value!r}")
            else:
                known = sorted(SAMPLING_KEYS | set(NOOP_KEYS) | TRITON_PARAMETERS)
                raise BadRequest(f"unknown request parameter {key!r}; supported: {', '.join(known)}")
        return timeout

    @staticmethod
    def _set(
        s: pb.SamplingParams, key: str, value: Any, where: str, seen: dict[str, tuple[Any, str]]
    ) -> None:
        # Each value as its own type, nothing coerced that could mean something else: a string
        # "128" is not the token ids [1, 2, 8], nor "false" true. Numbers may come as numeric
        # strings (as Triton's vLLM backend documents them), for every numeric key alike.
        try:
            if key in ("max_tokens", "top_k", "min_tokens"):
                norm: Any = _as_int(value)
                if key == "max_tokens" and norm < 1:
                    raise BadRequest(f"{where}: must be >= 1, got {value}")
            elif key in FLOAT_KEYS:
                # As the float32 field holds it: an FP32 tensor's 0.7 and JSON's 0.7 agree, and
                # 1e39 is refused here rather than sent on as infinity.
                norm = struct.unpack("<f", struct.pack("<f", _as_float(value)))[0]
            elif key == "seed":
                try:
                    norm = request_seed(_as_int(value))
                except RequestError as e:
                    raise BadRequest(f"{where}: {str(e).split(': ', 1)[-1]}") from None
            elif key == "ignore_eos":
                norm = _as_bool(value)
            elif key == "stop":
                norm = [value] if isinstance(value, str) else value
                if not isinstance(norm, list) or not all(isinstance(x, str) for x in norm):
                    raise ValueError
            elif key == "stop_token_ids":
                if not isinstance(value, list):
                    raise ValueError
                norm = [_as_int(x) for x in value]
            elif key == "structured_outputs":
                # In the request's parameters map, a JSON text (a parameter holds one scalar).
                try:
                    obj = json.loads(value) if isinstance(value, str) else value
                except RecursionError:
                    raise BadRequest(f"{where}: not JSON: nested too deeply") from None
                try:
                    norm = StructuredOutputs.from_dict(obj)
                except RequestError as e:
                    raise BadRequest(f"{where}: {str(e).removeprefix('structured_outputs: ')}") from None
            elif key == "logit_bias":
                # A JSON object's keys are strings: token ids as "50256", as OpenAI's clients send them.
                if not isinstance(value, dict):
                    raise ValueError
                norm = {}
                for k, v in value.items():
                    token = json_token_id(k)
                    if token is None:
                        raise ValueError
                    norm[token] = _as_float(v)
            else:  # pragma: no cover - callers pass SAMPLING_KEYS only
                raise BadRequest(f"{where}: unknown key")
            if key in ("stop", "stop_token_ids"):
                # Lists from two places both apply: a stop of either ends the text.
                field = getattr(s, key)
                field.extend(x for x in norm if x not in field)
                return
            if key in seen and seen[key][0] != norm:
                raise BadRequest(f"{where}: {value!r} conflicts with {seen[key][1]} given as well")
            seen[key] = (norm, where)
            if norm is None:
                s.ClearField(key)  # a seed of -1: none
            elif key == "logit_bias":
                s.logit_bias.clear()
                s.logit_bias.update(norm)
            elif key == "structured_outputs":
                s.structured_outputs.CopyFrom(structured_to_pb(norm))
            else:
                setattr(s, key, norm)
        except (ValueError, TypeError, OverflowError, struct.error):
            raise BadRequest(f"{where}: bad value {value!r}") from None

    def _response(
        self,
        request: kpb.ModelInferRequest,
        t: _Translated,
        text: str,
        final: pb.GenerateResponse | None,
        final_flag: bool | None = None,
    ) -> kpb.ModelInferResponse:
        # The model that answered, also when the request named none (the base model).
        resp = kpb.ModelInferResponse(
            model_name=request.model_name or self.model_name, model_version=VERSION, id=request.id
        )
        for name in t.outputs:
            if name == "text_output":
                data = _serialize_bytes([text.encode()])
            elif name == "finish_reason":
                reason = FINISH.get(final.finish_reason, "") if final is not None else ""
                data = _serialize_bytes([reason.encode()])
            elif name == "num_input_tokens":
                data = np.array([final.usage.prompt_tokens if final else 0], "<u4").tobytes()
            else:
                data = np.array([final.usage.completion_tokens if final else 0], "<u4").tobytes()
            resp.outputs.add(name=name, datatype=OUTPUTS[name], shape=[1])
            resp.raw_output_contents.append(data)
        if final_flag is not None:
            resp.parameters["triton_final_response"].bool_param = final_flag
        return resp

    def _generate(self, request, t: _Translated, context, calls: set | None = None) -> Iterator:
        remaining = context.time_remaining()
        timeout = None if remaining is None or remaining > 1e8 else max(remaining, 0.001)
        if t.timeout is not None:
            timeout = t.timeout if timeout is None else min(timeout, t.timeout)
        call, settle = forward(self.stub, t.request, timeout, self.handoffs)
        if calls is not None:
            calls.add(call)
        elif not context.add_callback(call.cancel):
            call.cancel()  # the client already left: no callback would come
        try:
            yield from call
        finally:
            if calls is not None:
                calls.discard(call)
            settle()

    def ModelInfer(self, request, context):  # noqa: N802
        if request.model_version not in ("", VERSION):
            _refuse(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"model {request.model_name!r} has no version {request.model_version!r} (only {VERSION})",
            )
        try:
            t = self.translate(request)
        except BadRequest as e:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if t.stream:
            _refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "stream: token streaming needs the streaming call ModelStreamInfer",
            )
        try:
            text, final = self._collect(self._generate(request, t, context))
        except grpc.RpcError as e:
            context.abort(e.code(), e.details())
        return self._response(request, t, text if t.exclude_input else t.prompt + text, final)

    @staticmethod
    def _collect(messages: Iterator[pb.GenerateResponse]) -> tuple[str, pb.GenerateResponse | None]:
        text, final = "", None
        for msg in messages:
            text += msg.text
            if msg.finish_reason:
                final = msg
        if final is None:
            raise _ended()
        return text, final

    def ModelStreamInfer(self, request_iterator, context):  # noqa: N802
        """Each request on the stream runs concurrently; its responses carry its id. An error ends
        only that request (as `error_message`), as in Triton."""
        out: queue.Queue = queue.Queue()
        lock = threading.Lock()
        calls: set = set()
        pending = [0]
        reading = threading.Event()
        reading.set()
        wake = object()

        def cancel_all() -> None:
            for c in list(calls):
                c.cancel()

        if not context.add_callback(cancel_all):
            cancel_all()

        def run(req: kpb.ModelInferRequest) -> None:
            try:
                for resp in self._stream_one(req, context, calls):
                    out.put(resp)
            except Exception as e:  # noqa: BLE001 - reported on the stream, never lost
                log.exception("stream request %s failed", req.id)
                out.put(kpb.ModelStreamInferResponse(error_message=f"internal error: {e}"))
            finally:
                with lock:
                    pending[0] -= 1
                out.put(wake)

        def read() -> None:
            try:
                for req in request_iterator:
                    with lock:
                        pending[0] += 1
                    threading.Thread(target=run, args=(req,), name="kserve-stream-req", daemon=True).start()
            except grpc.RpcError:
                pass  # the client went away; the callback cancels what is running
            except Exception:  # noqa: BLE001
                log.exception("reading a ModelStreamInfer stream failed")
            finally:
                reading.clear()
                out.put(wake)

        threading.Thread(target=read, name="kserve-stream-read", daemon=True).start()
        while True:
            try:
                item = out.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    cancel_all()
                    return
                continue
            if item is wake:
                with lock:
                    if not reading.is_set() and pending[0] == 0 and out.empty():
                        return
                continue
            yield item

    def _stream_one(self, request, context, calls: set) -> Iterator[kpb.ModelStreamInferResponse]:
        def error(msg: str) -> kpb.ModelStreamInferResponse:
            return kpb.ModelStreamInferResponse(
                error_message=msg,
                infer_response=kpb.ModelInferResponse(
                    model_name=request.model_name or self.model_name, model_version=VERSION, id=request.id
                ),
            )

        # A name that is not listed may still be an adapter in the workers' store: the router
        # answers NOT_FOUND when it is not.
        if request.model_version not in ("", VERSION):
            _count_refused()
            yield error(f"model {request.model_name!r} has no version {request.model_version!r}")
            return
        try:
            t = self.translate(request)
        except BadRequest as e:
            _count_refused()
            yield error(f"INVALID_ARGUMENT: {e}")
            return
        empty_final = (
            request.parameters["triton_enable_empty_final_response"].bool_param
            if ("triton_enable_empty_final_response" in request.parameters)
            else False
        )
        try:
            if not t.stream:
                text, final = self._collect(self._generate(request, t, context, calls))
                yield kpb.ModelStreamInferResponse(
                    infer_response=self._response(
                        request, t, text if t.exclude_input else t.prompt + text, final, True
                    )
                )
                return
            first = True
            finished = False
            for msg in self._generate(request, t, context, calls):
                text = msg.text
                if first and not t.exclude_input:
                    text = t.prompt + text
                first = False
                final = msg if msg.finish_reason else None
                if final is not None:
                    finished = True
                    if empty_final and text:
                        yield kpb.ModelStreamInferResponse(
                            infer_response=self._response(request, t, text, None, False)
                        )
                        text = ""
                    resp = self._response(request, t, text, final, True)
                    if empty_final:
                        del resp.outputs[:]
                        del resp.raw_output_contents[:]
                    yield kpb.ModelStreamInferResponse(infer_response=resp)
                    break
                if text:
                    yield kpb.ModelStreamInferResponse(
                        infer_response=self._response(request, t, text, None, False)
                    )
            if not finished:
                raise _ended()
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and not context.is_active():
                return
            yield error(f"{e.code().name}: {e.details()}")


def _count_refused() -> None:
    """A request refused here, before any call upstream: the router, which counts every request it
    sees in `tandem_requests_total`, never sees this one. The caller's mistake (a malformed request,
    a model version that does not exist), so `invalid`, which attainment leaves out."""
    metrics.REQUESTS.labels(outcome="invalid").inc()


def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """Counts the request (`_count_refused`) and ends its call with `code`; once only, as the abort
    raises."""
    _count_refused()
    context.abort(code, details)
    raise AssertionError("unreachable: context.abort raises")


def _ended() -> grpc.RpcError:
    class Ended(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "the upstream stream ended without a finish reason"

    return Ended()


class KServeServer:
    def __init__(self, server: grpc.Server, service: KServeService, port: int, health_servicer: Any) -> None:
        self.server, self.service, self.port, self.health = server, service, port, health_servicer

    def set_serving(self, serving: bool) -> None:
        from grpc_health.v1 import health_pb2

        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for n in ("", SERVICE_NAME):
            self.health.set(n, status)

    def stop(self, grace: float) -> threading.Event:
        self.set_serving(False)
        return self.server.stop(grace)

    def close(self) -> None:
        self.service.close()


def serve_kserve(host: str, port: int, service: KServeService, max_workers: int = 528) -> KServeServer:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kserve"),
        options=EXCLUSIVE_PORT_OPTIONS,
    )
    kgrpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = listen(server, host, port, "KServe v2 gRPC")
    server.start()
    for n in ("", SERVICE_NAME):
        health_servicer.set(n, health_pb2.HealthCheckResponse.NOT_SERVING)
    return KServeServer(server, service, bound, health_servicer)


__all__ = ["KServeServer", "KServeService", "SERVICE_NAME", "serve_kserve"]


def _as_int(value: Any) -> int:
    """An integer, or a string or float that is exactly one; never a bool."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str):
        return int(value.strip())
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    return int(value)


def _as_float(value: Any) -> float:
    """A finite number, or a string of one; never a bool."""
    if isinstance(value, bool):
        raise ValueError
    v = float(value.strip() if isinstance(value, str) else value)
    if math.isnan(v) or math.isinf(v):
        raise ValueError
    return v


def _as_bool(value: Any) -> bool:
    """A bool, or the string "true" / "false"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError
