"""What an OpenAI request asks of the ONNX engine, and its answers in the openai package's types.

Answers are built with the official `openai` package's own models (ChatCompletion,
ChatCompletionChunk, Completion, CompletionUsage): the shapes its clients parse, maintained with
the API, and a pure-Python package the edge image carries anyway for nothing else. Requests are
type-checked against the same package's request types (its TypedDicts, through pydantic), so a
field of the wrong type gets a 400 naming it, as OpenAI's API answers. A field the engine cannot
honour (tools, response_format, logprobs, penalties, n > 1, ...) gets a 400 naming it: the edge
server never answers as if it had applied something it did not.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from serve.errors import OpenAIError

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"

# Fields the engine honours; anything else must be absent or at its "off" value. top_k,
# min_tokens and ignore_eos are vLLM's extensions of OpenAI's API, with vLLM's meaning.
HONOURED = {
    CHAT: {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
           "stop", "stream", "stream_options", "user", "n", "metadata", "store", "service_tier", "min_tokens",
           "ignore_eos"},
    COMPLETIONS: {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                  "stream_options", "user", "n", "best_of", "echo", "logprobs", "min_tokens", "ignore_eos"},
}
# A field at one of these values asks for nothing (clients such as LangChain send n: 1, logprobs: false).
OFF = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "echo": False, "logprobs": None,
       "parallel_tool_calls": None}


@dataclass
class Ask:
    """One parsed request: the conversation (chat) or the prompt (completions), sampling, output."""
    route: str
    model: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    min_tokens: int = 0  # end of sequence/turn not taken before this many tokens
    ignore_eos: bool = False  # generate through end of sequence/turn up to max_tokens


@lru_cache(maxsize=2)
def _checker(route: str):
    from openai.types import completion_create_params as completion
    from openai.types.chat import completion_create_params as chat
    from pydantic import TypeAdapter

    return TypeAdapter(chat.CompletionCreateParamsBase if route == CHAT else completion.CompletionCreateParamsBase)


def parse(route: str, body: dict[str, Any]) -> Ask:
    """The request as the engine runs it; OpenAIError 400 naming the field otherwise."""
    from pydantic import ValidationError

    try:
        _checker(route).validate_python(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first["loc"]) or None
        raise OpenAIError(400, f"{param or 'body'}: {first['msg']}", param=param) from None
    for key, value in body.items():
        if key in HONOURED[route] and (key not in OFF or value == OFF[key] or value is None):
            continue
        if value is None or value is False or value == [] or value == {} or (key in OFF and value == OFF[key]):
            continue
        raise OpenAIError(400, f"{key} is not supported by the edge server; leave it out, or "
                               "send this request to the vLLM server", param=key)
    stop = body.get("stop") or []
    opts = body.get("stream_options") or {}
    max_tokens = body.get("max_completion_tokens")
    ask = Ask(route=route, model=body.get("model") or "",
              max_tokens=max_tokens if max_tokens is not None else body.get("max_tokens"),
              temperature=float(body["temperature"]) if body.get("temperature") is not None else 1.0,
              top_p=float(body["top_p"]) if body.get("top_p") is not None else 1.0,
              top_k=_top_k(body), seed=_seed(body),
              stop=[stop] if isinstance(stop, str) else list(stop), stream=bool(body.get("stream")),
              include_usage=bool(opts.get("include_usage")), min_tokens=_count(body, "min_tokens"),
              ignore_eos=_flag(body, "ignore_eos"))
    if route == CHAT:
        ask.messages = _messages(body.get("messages"))
    else:
        ask.prompt = _prompt(body.get("prompt"))
    return ask


def _seed(body: dict[str, Any]) -> int | None:
    """`seed`: a whole number >= 0 (numpy's generators take no negative seed), or absent."""
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise OpenAIError(400, "seed: a whole number >= 0", param="seed")
    return seed


def _top_k(body: dict[str, Any]) -> int | None:
    """vLLM's `top_k`: a whole number; 0 or -1 (vLLM's "off") or absent: no top-k cut."""
    k = body.get("top_k")
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < -1:
        raise OpenAIError(400, "top_k: a whole number >= 1, or -1 or 0 for none", param="top_k")
    return k if k > 0 else None


def _count(body: dict[str, Any], key: str) -> int:
    """An extension field that the openai types do not check: a whole number >= 0, or absent."""
    value = body.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OpenAIError(400, f"{key}: a whole number >= 0", param=key)
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise OpenAIError(400, f"{key}: true or false", param=key)
    return value


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "messages: a non-empty list of messages is required", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise OpenAIError(400, f"messages.{i}.role: one of system, developer, user, assistant (tool messages "
                                   "need tools, which the edge server does not run)", param=f"messages.{i}.role")
        content = m.get("content")
        if isinstance(content, list):  # text parts only: the engine reads no images or audio
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise OpenAIError(400, f"messages.{i}.content: only text parts are supported", param=f"messages.{i}.content")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise OpenAIError(400, f"messages.{i}.content: text is required", param=f"messages.{i}.content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        return prompt
    raise OpenAIError(400, "prompt: one string (or one list of token ids) per request", param="prompt")


# ------------------------------------------------------------------------------- answers
def new_id(route: str) -> str:
    return ("chatcmpl-" if route == CHAT else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int):
    from openai.types import CompletionUsage

    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


def answer(ask: Ask, rid: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The whole answer (stream false)."""
    created = int(time.time())
    if ask.route == CHAT:
        from openai.types.chat import ChatCompletion

        obj = ChatCompletion(id=rid, object="chat.completion", created=created, model=ask.model,
                             choices=[{"index": 0, "finish_reason": finish,
                                       "message": {"role": "assistant", "content": text}}],
                             usage=usage(prompt_tokens, completion_tokens))
    else:
        from openai.types import Completion

        obj = Completion(id=rid, object="text_completion", created=created, model=ask.model,
                         choices=[{"index": 0, "finish_reason": finish, "text": text}],
                         usage=usage(prompt_tokens, completion_tokens))
    return obj.model_dump(mode="json", exclude_none=True)


def chunk(ask: Ask, rid: str, created: int, text: str | None = None, finish: str | None = None,
          role: bool = False, usage_of: tuple[int, int] | None = None) -> dict:
    """One stream chunk: a text delta, the finish reason, or (choices empty) the usage."""
    if ask.route == CHAT:
        from openai.types.chat import ChatCompletionChunk

        choices = [] if usage_of else [{"index": 0, "finish_reason": finish,
                                        "delta": {"role": "assistant", "content": text or ""} if role
                                        else ({"content": text} if text is not None else {})}]
        obj = ChatCompletionChunk(id=rid, object="chat.completion.chunk", created=created, model=ask.model,
                                  choices=choices, usage=usage(*usage_of) if usage_of else None)
    else:
        from openai.types import Completion

        # The type's finish_reason is never null; a stream's is until its last chunk (set below).
        choices = [] if usage_of else [{"index": 0, "finish_reason": finish or "stop", "text": text or ""}]
        obj = Completion(id=rid, object="text_completion", created=created, model=ask.model,
                         choices=choices, usage=usage(*usage_of) if usage_of else None)
    out = obj.model_dump(mode="json", exclude_none=True)
    if not usage_of:
        out["choices"][0]["finish_reason"] = finish  # null until the last chunk, as OpenAI streams it
    return out
