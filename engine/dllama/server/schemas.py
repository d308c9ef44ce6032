"""Request validation: OpenAI's fields in, typed requests out, or a 400 naming the field.

Fields we do not act on (user, presence_penalty, ...) are accepted and ignored, as clients send
them by default; fields whose meaning we cannot honour (n > 1, logprobs, tools) are refused, so
a client never silently gets less than it asked for.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError, bad_request

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_STRINGS = 16
SEED_MODULUS = 1 << 64  # OpenAI seeds may be negative; the sampler's are 64-bit unsigned
# Objects and lists nested deeper than this are refused: everything downstream of parsing (copies,
# the chat template) recurses once per level, and a real request nests about 5 deep
# (body > messages > message > content > part).
MAX_JSON_DEPTH = 32


@dataclass
class Sampling:
    max_tokens: int | None  # None: the rest of the context
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]  # ready for the chat template: string contents, known roles
    enable_thinking: bool | None
    template_kwargs: dict[str, Any]
    sampling: Sampling


@dataclass
class CompletionRequest:
    prompt: str | list[int]  # text, or token ids
    echo: bool
    sampling: Sampling


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad_request(f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    too_deep = _nested_too_deep(data)
    if too_deep is not None:
        raise bad_request(f"'{too_deep}' nests objects or lists deeper than {MAX_JSON_DEPTH} levels.",
                          param=too_deep, code="invalid_value")
    try:  # JSON may escape lone surrogates (\ud800) that no tokenizer can take
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("The request holds invalid Unicode: a lone surrogate escape (\\uD800-\\uDFFF).",
                          code="invalid_unicode") from None
    return data


def chat_request(data: dict[str, Any], defaults: Sampling) -> ChatRequest:
    _optional(data, "model", str)
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise bad_request("'messages' must be a list of message objects.", param="messages",
                          code="missing_required_parameter" if messages is None else "invalid_type")
    if not messages:
        raise bad_request("'messages' must contain at least one message.", param="messages", code="empty_array")
    chat = [_message(m, i) for i, m in enumerate(messages)]

    tools = data.get("tools")
    if tools not in (None, []):
        raise bad_request("Tool calling is not supported by this server.", param="tools", code="unsupported_parameter")
    _refuse_truthy(data, "logprobs")
    _refuse_not_null(data, "top_logprobs")
    response_format = data.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise bad_request("Only response_format {'type': 'text'} is supported.", param="response_format",
                          code="unsupported_parameter")

    kwargs = data.get("chat_template_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise bad_request("'chat_template_kwargs' must be an object.", param="chat_template_kwargs",
                          code="invalid_type")
    kwargs = dict(kwargs)
    enable_thinking = kwargs.pop("enable_thinking", None)
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise bad_request("'chat_template_kwargs.enable_thinking' must be a boolean.",
                          param="chat_template_kwargs.enable_thinking", code="invalid_type")
    for reserved in ("messages", "tools", "documents", "add_generation_prompt", "chat_template"):
        if reserved in kwargs:
            raise bad_request(f"'chat_template_kwargs.{reserved}' cannot be set.",
                              param=f"chat_template_kwargs.{reserved}", code="invalid_value")

    max_tokens = _optional_int(data, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _optional_int(data, "max_tokens", 1)
    return ChatRequest(messages=chat, enable_thinking=enable_thinking, template_kwargs=kwargs,
                       sampling=_sampling(data, defaults, max_tokens))


def completion_request(data: dict[str, Any], defaults: Sampling, default_max_tokens: int = 16) -> CompletionRequest:
    _optional(data, "model", str)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("'prompt' must not be empty.", param="prompt", code="invalid_value")
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        pass  # token ids; their range is checked against the vocabulary later
    elif prompt is None:
        raise bad_request("'prompt' is required.", param="prompt", code="missing_required_parameter")
    else:
        raise bad_request("'prompt' must be a string, or a list of token ids (one prompt per request).",
                          param="prompt", code="invalid_type")
    _refuse_not_null(data, "logprobs")
    _refuse_not_null(data, "suffix")
    best_of = data.get("best_of")
    if best_of not in (None, 1):
        raise bad_request("Only best_of=1 is supported.", param="best_of", code="unsupported_parameter")
    echo = _optional(data, "echo", bool) or False
    max_tokens = _optional_int(data, "max_tokens", 1)
    if "max_tokens" not in data:
        max_tokens = default_max_tokens  # OpenAI's default for completions
    return CompletionRequest(prompt=prompt, echo=echo, sampling=_sampling(data, defaults, max_tokens))


def _nested_too_deep(data: dict[str, Any]) -> str | None:
    """The first top-level field nesting deeper than MAX_JSON_DEPTH (the body itself is level 1),
    or None. A loop, not recursion: this is what keeps recursion away from the rest."""
    stack: list[tuple[str, Any, int]] = [(name, value, 2) for name, value in data.items()]
    while stack:
        name, value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if depth > MAX_JSON_DEPTH:
            return name
        stack.extend((name, child, depth + 1) for child in children)
    return None


# fields


def _message(message: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad_request(f"'{where}' must be an object with 'role' and 'content'.", param=where, code="invalid_type")
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(f"'{where}.role' must be one of {', '.join(ROLES)}; got {_show(role)}.",
                          param=f"{where}.role", code="invalid_value")
    content = message.get("content")
    if content is None:
        if role != "assistant":
            raise bad_request(f"'{where}.content' is required for role '{role}'.", param=f"{where}.content",
                              code="missing_required_parameter")
        content = ""
    elif isinstance(content, list):
        content = _text_parts(content, f"{where}.content")
    elif not isinstance(content, str):
        raise bad_request(f"'{where}.content' must be a string or a list of text parts.", param=f"{where}.content",
                          code="invalid_type")
    out: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
    for name in ("name", "tool_call_id", "reasoning_content"):
        value = message.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise bad_request(f"'{where}.{name}' must be a string.", param=f"{where}.{name}", code="invalid_type")
            out[name] = value
    if message.get("tool_calls") not in (None, []):
        raise bad_request("Tool calls are not supported by this server.", param=f"{where}.tool_calls",
                          code="unsupported_parameter")
    return out


def _text_parts(parts: list[Any], where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        here = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise bad_request(f"'{here}' must be a content part object.", param=here, code="invalid_type")
        if part.get("type") != "text":
            raise bad_request(f"'{here}.type' {_show(part.get('type'))} is not supported: only text parts are.",
                              param=f"{here}.type", code="unsupported_value")
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"'{here}.text' must be a string.", param=f"{here}.text", code="invalid_type")
        texts.append(text)
    return "\n".join(texts)  # the chat templates concatenate content as one string


def _sampling(data: dict[str, Any], defaults: Sampling, max_tokens: int | None) -> Sampling:
    n = data.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise bad_request("Only n=1 is supported.", param="n", code="unsupported_parameter")
    temperature = _optional_number(data, "temperature", 0.0, 2.0)
    top_p = _optional_number(data, "top_p", 0.0, 1.0, low_open=True)
    seed = _optional_int(data, "seed")
    stop = data.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad_request("'stop' must be a string or a list of strings.", param="stop", code="invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' may hold at most {MAX_STOP_STRINGS} strings.", param="stop", code="invalid_value")
    if any(not s for s in stops):
        raise bad_request("'stop' strings must not be empty.", param="stop", code="invalid_value")
    stream = _optional(data, "stream", bool) or False
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object.", param="stream_options", code="invalid_type")
        include_usage = _optional(options, "include_usage", bool, "stream_options.include_usage") or False
    return Sampling(
        max_tokens=max_tokens,
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        seed=defaults.seed if seed is None else seed % SEED_MODULUS,
        stop=stops,
        stream=stream,
        include_usage=include_usage and stream,
    )


def _optional(data: dict[str, Any], name: str, kind: type, param: str | None = None) -> Any:
    value = data.get(name)
    if value is not None and not isinstance(value, kind):
        raise bad_request(f"'{param or name}' must be a {_KIND_NAMES[kind]}.", param=param or name, code="invalid_type")
    return value


def _optional_int(data: dict[str, Any], name: str, minimum: int | None = None) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise bad_request(f"'{name}' must be an integer.", param=name, code="invalid_type")
    if minimum is not None and value < minimum:
        raise bad_request(f"'{name}' must be at least {minimum}; got {value}.", param=name, code="invalid_value")
    return value


def _optional_number(data: dict[str, Any], name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number.", param=name, code="invalid_type")
    if value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad_request(f"'{name}' must be in {bounds}; got {value}.", param=name, code="invalid_value")
    return float(value)


def _refuse_truthy(data: dict[str, Any], name: str) -> None:
    if data.get(name):
        raise bad_request(f"'{name}' is not supported by this server.", param=name, code="unsupported_parameter")


def _refuse_not_null(data: dict[str, Any], name: str) -> None:
    if data.get(name) not in (None, False, 0):
        raise bad_request(f"'{name}' is not supported by this server.", param=name, code="unsupported_parameter")


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_KIND_NAMES = {str: "string", bool: "boolean", int: "integer", dict: "object", list: "list"}

__all__ = ["ApiError", "ChatRequest", "CompletionRequest", "Sampling", "chat_request", "completion_request",
           "parse_json"]
