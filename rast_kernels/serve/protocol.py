"""Requests of the OpenAI-compatible endpoints: typed request models (pydantic v2), and a validated body in, a
:class:`Job` or an :class:`APIError` naming the field out. No web framework here, so it is tested directly.

Spec (fields keep their OpenAI meaning; RAST adds ``alpha``, ``base_plausibility``, ``top_k``, ``min_p``,
``ignore_eos``, ``return_token_ids``):

* :class:`CompletionRequest` (``/v1/completions``): ``prompt`` (a string, a list of token ids, or a list of strings
  and token-id lists; required, nothing empty), ``max_tokens`` (default 16; 0 only with ``echo``), ``temperature``,
  ``top_p``, ``n`` (at most ``limits.max_n``), ``stop`` (a string or at most ``MAX_STOP`` non-empty strings),
  ``seed``, ``logprobs`` (null; 0: each generated token's log-probability as the sampler drew it; 1 to
  ``MAX_TOP_LOGPROBS`` only with ``echo``), ``echo`` (the prompt is returned before the completion and, with
  ``logprobs``, every prompt and completion token is scored under the combined RAST distribution, see
  :mod:`rast_kernels.engine.scoring`: the first prompt token's logprob is null, ``top_logprobs`` maps token
  strings to the ``logprobs`` most likely tokens' logprobs plus the token's own; not with ``stream``),
  ``stream``, ``stream_options.include_usage``, ``best_of`` (null or ``n``), ``frequency_penalty`` /
  ``presence_penalty`` (0 only), ``logit_bias`` (empty only), ``suffix`` (null only), ``user`` (ignored),
  ``model`` (the served name when given).
* :class:`ChatCompletionRequest` (``/v1/chat/completions``): ``messages`` (a non-empty list of
  ``{"role", "content": str | [text parts] | null, "name"?}``) instead of ``prompt``; ``max_tokens`` /
  ``max_completion_tokens`` default to what fits the context; ``logprobs`` is a bool and ``top_logprobs`` null or 0.
* both: ``alpha`` (a number, or a list of one number per expert pair; default: the server's),
  ``base_plausibility``, ``top_k`` (any int64 >= 0: a k >= the vocabulary keeps every token), ``min_p``,
  ``ignore_eos`` (generate until ``max_tokens`` or a stop string), ``return_token_ids`` (each choice also carries
  its ``token_ids``). Every sampling parameter's range is :data:`rast_kernels.params.RANGES`' (published in the
  schema through :meth:`~rast_kernels.params.Range.pydantic_bounds`).

Types are strict (``"10"`` is not 10, 1 is not ``true``), except that an integer field takes an integral JSON
number (3.0 is 3, as JSON Schema's ``integer`` says; 3.5 is refused). :func:`request_schemas` is what
``/openapi.json`` publishes (with this server's bounds: the ``model`` name, ``n``, ``max_tokens``, token ids).

Errors: a bad value is a 400 whose ``param`` is the field's path from the validation error's ``loc`` (dotted for
nested fields: ``messages.0.content``, ``stop.1``) and whose message starts with it; an engine-side
:class:`~rast_kernels.params.ParamError` is named by its ``param`` (:func:`public_param`); unknown fields are
refused (a misspelt ``temprature`` would otherwise be silently ignored); a string or key holding a lone surrogate
is a 400 naming where it is. An unknown ``model`` is a 404. Fit checks that need the tokenized prompt (the
vocabulary, prompt + max_tokens within ``max_seq_len``) are made by the engine loop before anything is queued.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError, WithJsonSchema
from pydantic.json_schema import models_json_schema

from ..engine.sampling_params import SamplingParams
from ..params import RANGES, ParamError

MAX_STOP = 16  # OpenAI allows 4; more only costs a few string searches per step, but unbounded would not
MAX_TOP_LOGPROBS = 20  # top alternatives per echoed token (vLLM's default cap)


class APIError(Exception):
    """An error response: HTTP ``status``, the offending field ``param`` (or None) and a message that starts with
    it. Rendered as OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, param: Optional[str], message: str, *, type: str = "invalid_request_error",
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.param, self.message, self.type, self.code = status, param, message, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, why: str, code: Optional[str] = None) -> APIError:
    return APIError(400, param, f"{param}: {why}", code=code)


# ---------------------------------------------------------------------------------------------- request models
def _json_kind(v) -> str:
    """The JSON type of a parsed value (discriminates the unions below, so that one member is tried)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    return "string" if isinstance(v, str) else "array" if isinstance(v, list) else "object"


def _one_of(members: Dict[str, Any], what: str, kinds: Optional[Dict[str, str]] = None):
    """A union picked by the value's JSON type (``kinds`` maps other JSON types onto a member's tag): one member
    is validated, so an error's ``loc`` never lists the members that did not apply, and a value of no listed type
    is one error at the field itself."""
    kinds = kinds or {}
    tagged = tuple(Annotated[t, Tag(tag)] for tag, t in members.items())
    pick = Discriminator(lambda v: kinds.get(_json_kind(v), _json_kind(v)), custom_error_type="wrong_json_type",
                         custom_error_message=f"expected {what}")
    return Annotated[Union[tagged], pick]


def _bounds(name: str, **changes) -> dict:
    """``pydantic.Field`` keywords for the parameter ``name`` of :data:`RANGES` (``changes`` derive a variant)."""
    r = dataclasses.replace(RANGES[name], **changes) if changes else RANGES[name]
    kw = dict(r.pydantic_bounds(), description=r.meaning or None)
    if r.kind == "float" and r.finite:
        kw["allow_inf_nan"] = False
    return kw


def _integral(v):
    # JSON has one number type: 3.0 is the integer 3 (JSON Schema's "integer" says so, and some encoders write
    # every number with a point); 3.5 is not, and stays an error
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _int(**bounds):
    """An integer type with ``bounds`` (``ge`` / ``lt`` ...) that takes integral JSON numbers: the bounds sit
    inside, where the published schema shows them as ``minimum`` / ``exclusiveMaximum``."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


def _int_range(name: str, **changes):
    kw = _bounds(name, **changes)
    kw.pop("description")
    return _int(**kw)


TokenId = _int(ge=0)
TokenIds = List[TokenId]
Number = Annotated[float, Field(**_bounds("alpha"))]
Alpha = _one_of({"number": Number, "array": Annotated[List[Number], Field(min_length=1)]},
                "a number or a non-empty array of numbers (one per expert pair)", {"integer": "number"})
Stop = _one_of({"string": Annotated[str, Field(min_length=1)],
                "array": Annotated[List[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)]},
               f"a string or an array of at most {MAX_STOP} non-empty strings")
PromptItem = _one_of({"integer": TokenId, "string": str, "array": TokenIds},
                     "a token id, a string or an array of token ids", {"number": "integer"})
_IDS_SCHEMA = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
# the published form is the precise one (nothing empty, token ids not mixed with prompts); validation takes the
# looser union so that those two cases get to_job's messages about the prompt
Prompt = Annotated[_one_of({"string": str, "array": List[PromptItem]},
                           "a string, an array of token ids, or an array of strings and token-id arrays"),
                   WithJsonSchema({"oneOf": [{"type": "string", "minLength": 1}, _IDS_SCHEMA, {
                       "type": "array", "minItems": 1,
                       "items": {"oneOf": [{"type": "string", "minLength": 1}, _IDS_SCHEMA]}}]})]


_ONLY_ZERO = {"minimum": 0, "maximum": 0}
_MAX_TOKENS = RANGES["max_new_tokens"].meaning


class _Strict(BaseModel):
    # strict: no coercion ("10" is not 10, 1.5 is not an int, 1 is not true); unknown fields are refused
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Annotated[str, Field(min_length=1)]
    content: Optional[_one_of({"string": str, "array": List[TextPart]}, "a string or an array of text parts")] = None
    name: Optional[str] = None


class _Common(_Strict):
    """The fields both endpoints take."""

    model: Optional[str] = None
    temperature: Optional[float] = Field(None, **_bounds("temperature"))
    top_p: Optional[float] = Field(None, **_bounds("top_p"))
    n: Optional[_int_range("n")] = Field(None, description=RANGES["n"].meaning)
    stop: Optional[Stop] = None
    seed: Optional[_int_range("seed")] = Field(None, description=RANGES["seed"].meaning)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # accepted for OpenAI clients that send the neutral value; the schema says which (the check is to_job's)
    frequency_penalty: Optional[float] = Field(None, description="only 0", allow_inf_nan=False,
                                               json_schema_extra=_ONLY_ZERO)
    presence_penalty: Optional[float] = Field(None, description="only 0", allow_inf_nan=False,
                                              json_schema_extra=_ONLY_ZERO)
    logit_bias: Optional[Dict[str, float]] = Field(None, description="only empty",
                                                   json_schema_extra={"maxProperties": 0})
    alpha: Optional[Alpha] = Field(None, description="weight of each expert pair's delta: one number for every "
                                                     "pair or one per pair (default: the server's --alpha)")
    top_k: Optional[_int_range("top_k")] = Field(None, description=RANGES["top_k"].meaning)
    min_p: Optional[float] = Field(None, **_bounds("min_p"))
    base_plausibility: Optional[float] = Field(None, **_bounds("base_plausibility"))
    ignore_eos: bool = Field(False, description="generate until max_tokens or a stop string")
    return_token_ids: bool = Field(False, description="each choice also carries its generated token_ids")


class CompletionRequest(_Common):
    """Body of ``POST /v1/completions`` (module docstring)."""

    prompt: Prompt
    # 0 scores the prompt without generating (echo); the upper bound is the server's max_seq_len
    max_tokens: Optional[_int_range("max_new_tokens", low=0)] = Field(None, description=_MAX_TOKENS)
    logprobs: Optional[_int(ge=0, le=MAX_TOP_LOGPROBS)] = Field(
        None, description="0: the sampled tokens' logprobs; > 0 (with echo): top alternatives")
    echo: bool = Field(False, description="return the prompt before the completion (and, with logprobs, the "
                                          "prompt tokens' logprobs under the combined distribution)")
    best_of: Optional[_int()] = Field(None, description="null or n")
    suffix: Optional[str] = Field(None, description="only null", json_schema_extra={"type": "null"})


class ChatCompletionRequest(_Common):
    """Body of ``POST /v1/chat/completions`` (module docstring)."""

    messages: Annotated[List[ChatMessage], Field(min_length=1)]
    max_tokens: Optional[_int_range("max_new_tokens")] = Field(None, description=_MAX_TOKENS)
    max_completion_tokens: Optional[_int_range("max_new_tokens")] = Field(None, description=_MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: Optional[_int(ge=0, le=0)] = Field(None, description="only 0")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every 4xx / 5xx answer."""

    error: ErrorDetail


MODELS = {"completion": CompletionRequest, "chat": ChatCompletionRequest}


def request_schemas(limits: Optional["Limits"] = None, ref_template: str = "#/components/schemas/{model}") -> dict:
    """JSON schemas of both request bodies and the models they use, by name (for OpenAPI's ``components``); with
    ``limits``, also this server's bounds (the served ``model`` name, ``n``, ``max_tokens``, token ids)."""
    _, top = models_json_schema([(m, "validation") for m in MODELS.values()], ref_template=ref_template)
    schemas = copy.deepcopy(top["$defs"])  # edited below: the models' own schema objects stay as they are
    if limits is not None:
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            props = schemas[name]["properties"]
            props["model"]["anyOf"] = [{"const": limits.model_name, "type": "string"}, {"type": "null"}]
            _set_max(props["n"], limits.max_n)
            for field in ("max_tokens", "max_completion_tokens"):
                if field in props:
                    _set_max(props[field], limits.max_seq_len - 1)
        if limits.vocab_size is not None:
            _bound_token_ids(schemas["CompletionRequest"]["properties"]["prompt"], limits.vocab_size - 1)
    return schemas


def _bound_token_ids(schema, high: int) -> None:
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            schema["maximum"] = high
        for v in schema.values():
            _bound_token_ids(v, high)
    elif isinstance(schema, list):
        for v in schema:
            _bound_token_ids(v, high)


def _set_max(prop: dict, high: int) -> None:
    for s in prop["anyOf"]:
        if s.get("type") == "integer":
            s["maximum"] = min(high, s.get("maximum", high))


# ---------------------------------------------------------------------------------------------- errors
def _json_type(v) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return f"the integer {v}" if abs(v) < 10**18 else "an integer"
    if isinstance(v, float):
        return f"the number {v}"
    return {"null": "null", "string": "a string", "array": "an array"}.get(_json_kind(v), "an object")


def error_param(loc, body, missing: bool = False) -> Optional[str]:
    """The dotted field path of a validation error's ``loc`` in ``body``: object keys and array indices found in
    the body are kept; anything else (a union member's tag) is dropped, except a last key that is ``missing``."""
    parts, value = [], body
    for i, step in enumerate(loc):
        if isinstance(value, dict) and isinstance(step, str):
            if step in value or (missing and i == len(loc) - 1):
                parts.append(step)
                value = value.get(step)
        elif isinstance(value, list) and isinstance(step, int) and 0 <= step < len(value):
            parts.append(str(step))
            value = value[step]
    return ".".join(parts) or None


def from_validation_error(exc: ValidationError, body: dict, kind: str) -> APIError:
    """The 400 for a request model's first error (an unknown field first), named by its ``loc``."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    e = errors[0]
    param = error_param(e["loc"], body, missing=e["type"] == "missing") or "body"
    if e["type"] == "extra_forbidden":
        hint = {("completion", "messages"): " (chat messages go to /v1/chat/completions)",
                ("chat", "prompt"): " (a prompt goes to /v1/completions)"}.get((kind, param), "")
        return bad(param, "unrecognized field" + hint)
    if e["type"] == "missing":
        return bad(param, "required")
    return bad(param, f"{e['msg']}, got {_json_type(e.get('input'))}")


_PUBLIC = {"max_new_tokens": "max_tokens", "return_logprobs": "logprobs", "eos_token_id": "ignore_eos"}


def public_param(param: str, prompt_param: str = "prompt") -> str:
    """A :class:`~rast_kernels.params.ParamError`'s ``param`` as the request names it (``max_new_tokens`` ->
    ``max_tokens``, ``alpha[1]`` -> ``alpha.1``, the engine's ``prompt`` / ``prompts[i]`` -> ``prompt_param``)."""
    head, sep, rest = param.partition("[")
    if head in ("prompt", "prompts"):
        return prompt_param
    head = _PUBLIC.get(head, head)
    return head + ("." + rest.rstrip("]").replace("][", ".") if sep else "")


def from_param_error(exc: ParamError, prompt_param: str = "prompt") -> APIError:
    """The 400 for a :class:`~rast_kernels.params.ParamError`, named by its ``param`` (never by its text)."""
    name = public_param(exc.param, prompt_param)
    text = str(exc)
    detail = text[len(exc.param) + 2:] if text.startswith(exc.param + ": ") else text  # its own name: once
    return bad(name, detail)


# ---------------------------------------------------------------------------------------------- JSON bodies
def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _printable(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def surrogate_path(obj) -> Optional[str]:
    """The dotted path of a key or string value holding a lone surrogate (``"\\ud800"`` decodes to one, and no
    UTF-8 text can carry it), with such keys written escaped; None when there is none."""
    stack = [(obj, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                return path
        elif isinstance(value, dict):
            for k, v in value.items():
                p = f"{path}.{_printable(k)}" if path else _printable(k)
                if _has_surrogate(k):
                    return p
                stack.append((v, p))
        elif isinstance(value, list):
            stack.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value))
    return None


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 naming ``body`` (invalid JSON, NaN/Infinity, numbers too long to
    convert, nesting too deep for the parser, not an object) or the field holding a lone surrogate."""

    def no_constant(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad("body", f"not UTF-8 ({exc.reason} at byte {exc.start})")
    try:
        obj = json.loads(text, parse_constant=no_constant)
    except RecursionError:
        raise bad("body", "JSON nested too deeply")
    except json.JSONDecodeError as exc:
        raise bad("body", f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    except ValueError as exc:  # NaN / Infinity, or an integer with more digits than Python converts
        raise bad("body", f"invalid JSON: {exc}")
    if not isinstance(obj, dict):
        raise bad("body", f"expected a JSON object, got {_json_type(obj)}")
    if "\\u" in text:  # only an escape can make a surrogate (raw UTF-8 cannot encode one)
        where = surrogate_path(obj)
        if where is not None:
            raise bad(where, "holds a lone surrogate (an unpaired \\ud800-\\udfff escape): not Unicode text",
                      code="invalid_unicode")
    return obj


# ---------------------------------------------------------------------------------------------- jobs
@dataclasses.dataclass(frozen=True)
class Limits:
    """Server-wide bounds applied while validating (``max_seq_len`` comes from the engine)."""

    max_seq_len: int
    max_n: int = 64
    max_prompts: int = 64
    max_choices: int = 256  # prompts * n per request
    default_alpha: float = 1.0
    model_name: str = "rast"
    vocab_size: Optional[int] = None  # published as the token ids' bound (the engine loop checks them)


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    """A chat-template rendering, tokenized without adding special tokens (the template already has them)."""

    text: str


@dataclasses.dataclass
class Job:
    """A validated request: prompts (token ids, a string to tokenize with the tokenizer's special tokens, or a
    :class:`ChatPrompt`), one :class:`SamplingParams` for all of them, and how to answer."""

    kind: str  # "completion" or "chat"
    prompts: List[Any]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    return_token_ids: bool = False
    max_tokens_auto: bool = False  # chat without max_tokens: what fits the context (resolved once tokenized)
    prompt_param: str = "prompt"
    echo: bool = False
    top_logprobs: int = 0  # with echo: alternatives per token
    generate: bool = True  # False: echo with max_tokens = 0 (score the prompt, generate nothing)

    @property
    def scored(self) -> bool:
        """Whether the engine loop scores each choice's tokens (echo with logprobs)."""
        return self.echo and self.logprobs


def _prompts(prompt) -> List[Union[str, List[int]]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]  # one prompt as token ids
    elif any(isinstance(t, int) for t in prompt):
        raise bad("prompt", "mixes token ids with strings or token-id arrays: give one token-id array or an array "
                            "of prompts")
    if not prompt:
        raise bad("prompt", "empty array: give at least one prompt")
    for i, p in enumerate(prompt):
        if not p:
            which = "the prompt" if len(prompt) == 1 else f"prompt {i}"
            raise bad("prompt", f"{which} is empty: give at least one character or token id")
    return list(prompt)


def _messages(messages: List[ChatMessage]) -> list:
    out = []
    for m in messages:
        content = "".join(p.text for p in m.content) if isinstance(m.content, list) else (m.content or "")
        entry = {"role": m.role, "content": content}
        if m.name is not None:
            entry["name"] = m.name
        out.append(entry)
    return out


def _unsupported(req, kind: str) -> None:
    for pen in ("frequency_penalty", "presence_penalty"):
        if getattr(req, pen) not in (None, 0):
            raise bad(pen, f"not supported (only 0), got {getattr(req, pen)}")
    if req.logit_bias:
        raise bad("logit_bias", "not supported (only null or {})")
    if req.stream_options is not None and not req.stream:
        raise bad("stream_options", "only allowed with stream: true")
    if kind == "completion":
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise bad("best_of", "only best_of = n (or null) is supported: choices are not ranked")
        if req.suffix is not None:
            raise bad("suffix", "not supported (no insertion)")
        if req.echo and req.stream:
            raise bad("echo", "not supported with stream: true (ask for the whole response)")
        if req.logprobs and not req.echo:
            raise bad("logprobs", "only 0 (the sampled token's log-probability) without echo: the fused sampler does "
                                  "not compute top alternatives (with echo: true, up to "
                                  f"{MAX_TOP_LOGPROBS} are scored)")
    elif req.top_logprobs:
        raise bad("top_logprobs", "only 0 is supported: the fused sampler does not compute top alternatives")


def _max_tokens(req, kind: str, limits: Limits):
    """``(max_tokens, the field that set it, auto)``; chat without either field: auto (what fits)."""
    if kind == "completion":
        mt, name = (16 if req.max_tokens is None else req.max_tokens), "max_tokens"
        if mt == 0 and not req.echo:
            raise bad(name, "0 is only allowed with echo: true (it scores the prompt without generating)")
        auto = False
    else:
        if None not in (req.max_tokens, req.max_completion_tokens) and req.max_tokens != req.max_completion_tokens:
            raise bad("max_completion_tokens", f"differs from max_tokens ({req.max_completion_tokens} != "
                                               f"{req.max_tokens}); give one")
        name = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
        mt = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        auto = mt is None
        mt = 1 if auto else mt  # replaced by what fits once tokenized
    if mt >= limits.max_seq_len:
        raise bad(name, f"{mt} leaves no room for a prompt within max_seq_len={limits.max_seq_len}")
    return mt, auto


def to_job(req: Union[CompletionRequest, ChatCompletionRequest], kind: str, limits: Limits) -> Job:
    """A validated request model as a :class:`Job`, after the checks that need the server's ``limits``."""
    if req.model is not None and req.model != limits.model_name:
        raise APIError(404, "model", f"model: {req.model!r} is not served here (this server serves "
                                     f"{limits.model_name!r})", code="model_not_found")
    if kind == "completion":
        prompts = _prompts(req.prompt)
        if len(prompts) > limits.max_prompts:
            raise bad("prompt", f"at most {limits.max_prompts} prompts per request, got {len(prompts)}")
    else:
        prompts = [_messages(req.messages)]  # rendered by the app (it holds the tokenizer)
    _unsupported(req, kind)
    max_tokens, auto = _max_tokens(req, kind, limits)
    n = 1 if req.n is None else req.n
    if n > limits.max_n:
        raise bad("n", f"at most {limits.max_n} samples per prompt, got {n}")
    if len(prompts) * n > limits.max_choices:
        raise bad("n", f"{len(prompts)} prompts x n={n} exceed {limits.max_choices} choices per request")
    echo = kind == "completion" and req.echo
    want_lp = req.logprobs is not None if kind == "completion" else req.logprobs
    kwargs = dict(max_new_tokens=max(max_tokens, 1), n=n, stop=req.stop, alpha=limits.default_alpha,
                  return_logprobs=want_lp and not echo)  # echo scores every token itself
    if req.ignore_eos:
        kwargs["eos_token_id"] = []
    for key in ("alpha", "base_plausibility", "temperature", "top_p", "top_k", "min_p", "seed"):
        if getattr(req, key) is not None:
            kwargs[key] = getattr(req, key)
    try:
        params = SamplingParams(**kwargs)
    except ParamError as exc:
        raise from_param_error(exc)
    return Job(kind=kind, prompts=prompts, params=params, stream=req.stream,
               include_usage=bool(req.stream_options and req.stream_options.include_usage), logprobs=want_lp,
               return_token_ids=req.return_token_ids, max_tokens_auto=auto,
               prompt_param="prompt" if kind == "completion" else "messages", echo=echo,
               top_logprobs=(req.logprobs or 0) if echo else 0, generate=max_tokens > 0)


def parse_request(body: dict, kind: str, limits: Limits) -> Job:
    """Validate a completion (``kind="completion"``) or chat (``kind="chat"``) JSON object into a :class:`Job`."""
    try:
        req = MODELS[kind].model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc, body, kind) from None
    return to_job(req, kind, limits)


def render_chat(tokenizer, template: Optional[str], messages: list) -> ChatPrompt:
    """``messages`` through the chat ``template`` (a 400 naming ``messages`` when there is none or it fails)."""
    if not template:
        raise bad("messages", "the tokenizer has no chat template; start the server with --chat-template FILE "
                              "(or chat_template=...) or use /v1/completions", code="no_chat_template")
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as exc:  # the template's own checks (e.g. roles must alternate) raise from Jinja
        raise bad("messages", f"the chat template rejected them: {type(exc).__name__}: {exc}")
    if not isinstance(text, str):
        raise bad("messages", "the chat template did not render to text")
    return ChatPrompt(text)
