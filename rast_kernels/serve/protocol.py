"""Request validation for the OpenAI-compatible endpoints: a JSON body in, a :class:`Job` spec or an
:class:`APIError` naming the field out. Pure Python (no web framework), so it is tested directly.

Spec (fields keep their OpenAI meaning; RAST adds ``alpha``, ``base_plausibility``, ``top_k``, ``min_p``):

* ``/v1/completions``: ``prompt`` (a string, a list of strings, a list of token ids, or a list of token-id lists;
  required), ``max_tokens`` (int >= 1, default 16), ``temperature``, ``top_p``, ``n`` (int >= 1, at most
  ``limits.max_n``), ``stop`` (a string or a list of at most ``MAX_STOP`` non-empty strings), ``seed`` (int64),
  ``logprobs`` (null or 0: the sampled token's log-probability; top alternatives are not computed by the fused
  sampler, so > 0 is refused), ``stream``, ``stream_options.include_usage``, ``echo`` (false only), ``best_of``
  (null or equal to ``n``), ``frequency_penalty`` / ``presence_penalty`` (0 only), ``logit_bias`` (empty only),
  ``suffix`` (null only), ``user`` (ignored), ``model`` (the served name when given).
* ``/v1/chat/completions``: ``messages`` (a non-empty list of ``{"role": str, "content": str | [text parts]}``)
  instead of ``prompt``; ``max_tokens`` / ``max_completion_tokens`` default to what fits the context;
  ``logprobs`` is a bool and ``top_logprobs`` null or 0.
* both: ``alpha`` (finite, or a list of one finite weight per expert pair; default: the server's),
  ``base_plausibility`` in [0, 1] (contrastive decoding's plausibility mask), ``top_k`` (int >= 0), ``min_p`` in
  [0, 1], ``ignore_eos``
  (bool: generate until ``max_tokens`` or a stop string), ``return_token_ids`` (bool: each choice also carries
  its ``token_ids``).

Every bad value is a 400 whose message starts with the field's name; unknown fields are refused (a misspelt
``temprature`` would otherwise be silently ignored). Fit checks that need the tokenized prompt (prompt +
max_tokens beyond ``max_seq_len`` or the KV pool) are the engine's, made when the job is added, also before
anything runs.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, List, Optional, Union

from ..engine.sampling_params import SamplingParams

MAX_STOP = 16  # OpenAI allows 4; more only costs a few string searches per step, but unbounded would not


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


@dataclass(frozen=True)
class Limits:
    """Server-wide bounds applied while validating (``max_seq_len`` comes from the engine)."""

    max_seq_len: int
    max_n: int = 64
    max_prompts: int = 64
    max_choices: int = 256  # prompts * n per request
    default_alpha: float = 1.0
    model_name: str = "rast"


@dataclass
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


@dataclass(frozen=True)
class ChatPrompt:
    """A chat-template rendering, tokenized without adding special tokens (the template already has them)."""

    text: str


_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "stream",
           "stream_options", "user", "frequency_penalty", "presence_penalty", "logit_bias", "alpha", "top_k", "min_p",
           "base_plausibility", "ignore_eos", "return_token_ids"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}

# SamplingParams' field names -> the body's (its error messages start with its own names)
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "return_logprobs": "logprobs", "eos_token_id": "ignore_eos"}


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 naming ``body`` (invalid JSON, NaN/Infinity, numbers too long to
    convert, nesting too deep for the parser, not an object)."""

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
        raise bad("body", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _typed(body, name, check, what, default=None):
    v = body.get(name)
    if v is None:
        return default
    if not check(v):
        raise bad(name, f"expected {what}, got {_json_type(v)}")
    return v


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return f"the integer {v}" if abs(v) < 10**18 else "an integer"
    if isinstance(v, float):
        return f"the number {v}"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _parse_prompt(p) -> List[Union[str, List[int]]]:
    if isinstance(p, str):
        return [p]
    if not isinstance(p, list):
        raise bad("prompt", f"expected a string, a list of strings, a list of token ids or a list of token-id "
                            f"lists, got {_json_type(p)}")
    if not p:
        raise bad("prompt", "empty list: give at least one prompt")
    if all(_is_int(t) for t in p):
        return [list(p)]
    out = []
    for i, item in enumerate(p):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list):
            for t in item:
                if not _is_int(t):
                    raise bad(f"prompt[{i}]", f"token ids must be integers, got {_json_type(t)}")
            out.append(list(item))
        else:
            raise bad(f"prompt[{i}]", f"expected a string or a list of token ids, got {_json_type(item)}")
    return out


def _parse_messages(m) -> list:
    if not isinstance(m, list) or not m:
        raise bad("messages", f"expected a non-empty list of messages, got {_json_type(m)}"
                  if not isinstance(m, list) else "empty list: give at least one message")
    out = []
    for i, msg in enumerate(m):
        name = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(name, f"expected an object with role and content, got {_json_type(msg)}")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise bad(f"{name}.role", f"expected a non-empty string, got {_json_type(role)}")
        content = msg.get("content")
        if isinstance(content, list):  # OpenAI content parts: only text can be served by a text model
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{name}.content[{j}]", "expected {\"type\": \"text\", \"text\": <string>}")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad(f"{name}.content", f"expected a string or a list of text parts, got {_json_type(content)}")
        extra = {k: v for k, v in msg.items() if k not in ("role", "content", "name")}
        if extra:
            raise bad(f"{name}.{sorted(extra)[0]}", "unsupported message field (text chat only)")
        entry = {"role": role, "content": content}
        if isinstance(msg.get("name"), str):
            entry["name"] = msg["name"]
        out.append(entry)
    return out


def parse_request(body: dict, kind: str, limits: Limits) -> Job:
    """Validate a completion (``kind="completion"``) or chat (``kind="chat"``) body into a :class:`Job`."""
    allowed = COMPLETION_FIELDS if kind == "completion" else CHAT_FIELDS
    for k in body:
        if k not in allowed:
            hint = {"messages": " (chat messages go to /v1/chat/completions)",
                    "prompt": " (a prompt goes to /v1/completions)"}.get(k, "")
            raise bad(k, "unrecognized field" + hint)
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise bad("model", f"expected a string, got {_json_type(model)}")
        if model != limits.model_name:
            raise APIError(404, "model", f"model: {model!r} is not served here (this server serves "
                                         f"{limits.model_name!r})", code="model_not_found")

    if kind == "completion":
        if "prompt" not in body or body["prompt"] is None:
            raise bad("prompt", "required")
        prompts = _parse_prompt(body["prompt"])
        if len(prompts) > limits.max_prompts:
            raise bad("prompt", f"at most {limits.max_prompts} prompts per request, got {len(prompts)}")
        prompt_param = "prompt"
    else:
        if "messages" not in body:
            raise bad("messages", "required")
        prompts = [_parse_messages(body["messages"])]  # rendered by the app (it holds the tokenizer)
        prompt_param = "messages"

    max_tokens = _typed(body, "max_tokens", _is_int, "an integer")
    if kind == "chat":
        mct = _typed(body, "max_completion_tokens", _is_int, "an integer")
        if mct is not None and max_tokens is not None and mct != max_tokens:
            raise bad("max_completion_tokens", f"differs from max_tokens ({mct} != {max_tokens}); give one")
        max_tokens = max_tokens if max_tokens is not None else mct
    name = "max_tokens" if body.get("max_tokens") is not None or kind == "completion" else "max_completion_tokens"
    auto = max_tokens is None and kind == "chat"
    if max_tokens is None:
        max_tokens = 16 if kind == "completion" else 1  # chat: replaced by what fits once tokenized
    if max_tokens < 1:
        raise bad(name, f"must be >= 1, got {max_tokens}")
    if max_tokens >= limits.max_seq_len:
        raise bad(name, f"{max_tokens} leaves no room for a prompt within max_seq_len={limits.max_seq_len}")

    n = _typed(body, "n", _is_int, "an integer", 1)
    if n < 1:
        raise bad("n", f"must be >= 1, got {n}")
    if n > limits.max_n:
        raise bad("n", f"at most {limits.max_n} samples per prompt, got {n}")
    if len(prompts) * n > limits.max_choices:
        raise bad("n", f"{len(prompts)} prompts x n={n} exceed {limits.max_choices} choices per request")
    if kind == "completion":
        best_of = _typed(body, "best_of", _is_int, "an integer")
        if best_of is not None and best_of != n:
            raise bad("best_of", "only best_of = n (or null) is supported: choices are not ranked")
        if body.get("echo") not in (None, False):
            raise bad("echo", "only false is supported")
        if body.get("suffix") is not None:
            raise bad("suffix", "not supported (no insertion)")
    for pen in ("frequency_penalty", "presence_penalty"):
        v = _typed(body, pen, _is_num, "a number", 0)
        if v != 0:
            raise bad(pen, f"not supported (only 0), got {v}")
    lb = body.get("logit_bias")
    if lb is not None and not (isinstance(lb, dict) and not lb):
        raise bad("logit_bias", "not supported (only null or {})")
    _typed(body, "user", lambda v: isinstance(v, str), "a string")

    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list):
            raise bad("stop", f"expected a string or a list of strings, got {_json_type(stop)}")
        for i, s in enumerate(stop):
            if not isinstance(s, str):
                raise bad("stop", f"element {i}: expected a string, got {_json_type(s)}")
            if not s:
                raise bad("stop", f"element {i}: stop strings must be non-empty")
        if len(stop) > MAX_STOP:
            raise bad("stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
        stop = stop or None

    if kind == "completion":
        lp = body.get("logprobs")
        if lp is not None and not _is_int(lp):
            raise bad("logprobs", f"expected null or an integer, got {_json_type(lp)}")
        if lp is not None and lp != 0:
            raise bad("logprobs", "only 0 (the sampled token's log-probability) is supported: the fused sampler "
                                  "does not compute top alternatives")
        want_lp = lp is not None
    else:
        want_lp = bool(_typed(body, "logprobs", lambda v: isinstance(v, bool), "a boolean", False))
        tl = _typed(body, "top_logprobs", _is_int, "an integer")
        if tl not in (None, 0):
            raise bad("top_logprobs", "only 0 is supported: the fused sampler does not compute top alternatives")

    stream = _typed(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    so = _typed(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    include_usage = False
    if so is not None:
        if not stream:
            raise bad("stream_options", "only allowed with stream: true")
        for k in so:
            if k != "include_usage":
                raise bad(f"stream_options.{k}", "unrecognized field")
        include_usage = so.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad("stream_options.include_usage", f"expected a boolean, got {_json_type(include_usage)}")
    ignore_eos = _typed(body, "ignore_eos", lambda v: isinstance(v, bool), "a boolean", False)
    token_ids = _typed(body, "return_token_ids", lambda v: isinstance(v, bool), "a boolean", False)

    kwargs = dict(max_new_tokens=max_tokens, n=n, stop=stop, return_logprobs=want_lp,
                  alpha=limits.default_alpha)
    if ignore_eos:
        kwargs["eos_token_id"] = []
    for key in ("alpha", "base_plausibility", "temperature", "top_p", "top_k", "min_p", "seed"):
        if body.get(key) is not None:
            v = body[key]
            if key == "alpha" and isinstance(v, list):  # one weight per expert pair (the engine checks K)
                if not v or not all(_is_num(a) and not (isinstance(a, int) and abs(a) > 2**53) for a in v):
                    raise bad(key, "expected a number or a non-empty list of numbers")
                kwargs[key] = v
                continue
            if key in ("top_k", "seed") and not _is_int(v):
                raise bad(key, f"expected an integer, got {_json_type(v)}")
            if not _is_num(v):
                raise bad(key, f"expected a number, got {_json_type(v)}")
            if isinstance(v, int) and key not in ("top_k", "seed") and abs(v) > 2**53:
                raise bad(key, f"out of range, got {v}")
            if key == "top_k" and v > 2**31 - 1:  # SamplingParams takes any int; the engine's slot rows do not
                raise bad(key, f"must be <= {2**31 - 1} (a value >= the vocabulary size keeps every token), got {v}")
            kwargs[key] = v
    try:
        params = SamplingParams(**kwargs)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        field_name = msg.split(":", 1)[0]
        public = _PARAM_NAMES.get(field_name, field_name)
        raise bad(public, msg.split(":", 1)[1].strip() if ":" in msg else msg)
    return Job(kind=kind, prompts=prompts, params=params, stream=stream, include_usage=include_usage,
               logprobs=want_lp, return_token_ids=token_ids, max_tokens_auto=auto, prompt_param=prompt_param)


def dumps(obj) -> str:
    """Compact JSON (responses and stream chunks)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def finite(x: float) -> Optional[float]:
    """A logprob for JSON (``-inf`` cannot be encoded: null)."""
    return x if isinstance(x, numbers.Real) and math.isfinite(x) else None
