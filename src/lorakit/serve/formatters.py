"""Turning OpenAI requests into token ids and generated text into OpenAI responses: completions and chat.

Pure functions (no server, no engine): prompts in, token ids out; texts and finish reasons in, response
bodies and server-sent-event chunks out.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from ..data import chat_prompt_ids
from .engine import Event
from .schemas import ApiError, Message, error_body


@dataclass
class Reply:
    """One response being built: its id, the model named in the request, and its shape."""

    id: str
    model: str
    chat: bool
    n: int  # choices per prompt
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


def completion_prompts(prompt, tokenizer) -> list[list[int]]:
    """Token ids of each prompt of a /v1/completions request (text, ids, or lists of either)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]  # one prompt, as text or as token ids
    if not prompt:
        raise ApiError(400, "prompt is empty; send some text", param="prompt")
    out: list[list[int]] = []
    vocab = len(tokenizer)
    for item in prompt:
        if isinstance(item, str):
            if not item:
                raise ApiError(400, "prompt is empty; send some text", param="prompt")
            ids = tokenizer(item)["input_ids"]
        else:
            ids = list(item)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", param="prompt")
        if not ids:
            raise ApiError(400, "prompt is empty after tokenization; send some text", param="prompt")
        out.append(ids)
    return out


def chat_prompt(messages: list[Message], tokenizer) -> list[int]:
    """Token ids of a chat, rendered by the tokenizer's chat template with the assistant turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    rendered = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        rendered.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if not any(m["content"] for m in rendered):
        raise ApiError(400, "every message is empty; send some text", param="messages")
    try:
        ids = chat_prompt_ids(tokenizer, rendered)
    except Exception as err:  # the template's own checks (role order, ...) speak in jinja exceptions
        raise ApiError(400, f"the chat template refused these messages: {err}", param="messages") from None
    if not ids:
        raise ApiError(400, "the rendered chat prompt is empty", param="messages")
    return ids


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response(reply: Reply, texts: list[str], finish: list[str | None], prompt_tokens: int, completion_tokens: int):
    """The whole (non-streamed) response body."""
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f, "logprobs": None}
        if reply.chat
        else {"index": i, "text": t, "finish_reason": f, "logprobs": None}
        for i, (t, f) in enumerate(zip(texts, finish, strict=True))
    ]
    return {
        "id": reply.id,
        "object": reply.kind,
        "created": int(time.time()),
        "model": reply.model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(reply: Reply, choices: list[dict], usage_value: dict | None = None) -> str:
    """One server-sent event of a streamed response."""
    payload = {"id": reply.id, "object": reply.chunk_kind, "created": reply.created, "model": reply.model}
    payload["choices"] = choices
    if reply.include_usage:
        payload["usage"] = usage_value
    return f"data: {json.dumps(payload)}\n\n"


def opening_chunk(reply: Reply, count: int) -> str:
    """A chat stream opens with the assistant role for every choice."""
    delta = {"role": "assistant", "content": ""}
    return chunk(reply, [{"index": i, "delta": delta, "finish_reason": None, "logprobs": None} for i in range(count)])


def event_chunk(reply: Reply, index: int, event: Event) -> str:
    """The chunk carrying ``event``'s new text or finish reason for choice ``index``."""
    if reply.chat:
        delta = {"content": event.text} if event.text else {}
        return chunk(reply, [{"index": index, "delta": delta, "finish_reason": event.finish_reason, "logprobs": None}])
    return chunk(reply, [{"index": index, "text": event.text, "finish_reason": event.finish_reason, "logprobs": None}])


def error_chunk(event: Event) -> str:
    return f"data: {json.dumps(error_body(event.error_status, event.error))}\n\n"


DONE = "data: [DONE]\n\n"
