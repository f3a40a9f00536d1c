"""The one stop-token policy: the token ids a generation ends at, the same for evaluation's sample answers
(``train/evaluate``), the export's parity checks (``export/``), ``lorakit generate`` and the server
(``serve/engine``), so that what exact match scores during training is what the server returns.

A generation ends at any of:

- the tokenizer's EOS token;
- the EOS ids the model declares (``generation_config.eos_token_id`` and ``config.eos_token_id``: one id or a
  list, as Llama 3's ``[128001, 128008, 128009]``);
- the chat template's end-of-turn token: the special token the template writes right after an assistant message
  (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``), and the known end-of-turn tokens the
  template's text names that the vocabulary holds as one token (``<|eom_id|>`` of Llama 3.1's tool calls);
- where a GGUF file is involved, the ids it declares (``tokenizer.ggml.eos_token_id``, ``eot_token_id``,
  ``eom_token_id``): what llama.cpp ends a generation at. A model lorakit loads from a GGUF is converted with
  the file's EOS as its own, and its end-of-turn token is the template's, so the file adds nothing there in
  practice; the export's checks pass the file's ids all the same.

Imports nothing of lorakit: every layer above may use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

# Known end-of-turn tokens: ChatML, Llama 3 (end of turn, end of message), Gemma, Phi-3.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")
# The GGUF metadata keys of the ids llama.cpp ends a generation at.
GGUF_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
_PROBE = "lorakit stop probe"  # an assistant message's content, to find what the template writes after it


def stop_token_ids(tokenizer, model_config=None, gguf_ids: Iterable[int] | None = None) -> frozenset[int]:
    """The token ids a generation with ``tokenizer`` ends at (see the module docstring).

    ``model_config``: the model (its ``generation_config`` and ``config`` are read), a transformers config or a
    generation config, or None. ``gguf_ids``: the ids a GGUF declares (``gguf_stop_ids``), or None.
    """
    ids: set[int] = set()
    if tokenizer is not None:
        ids |= _ids(getattr(tokenizer, "eos_token_id", None))
        ids |= template_end_of_turn(tokenizer)
    for source in _declaring(model_config):
        ids |= _ids(getattr(source, "eos_token_id", None))
    ids |= _ids(list(gguf_ids or ()))
    return frozenset(ids)


def template_end_of_turn(tokenizer) -> frozenset[int]:
    """The chat template's end-of-turn token ids: the special token it writes right after an assistant message
    (when it writes one before any other text), and each of ``END_OF_TURN`` its text names that the vocabulary
    holds as one token. Empty without a chat template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return frozenset()
    text = template if isinstance(template, str) else " ".join(str(t) for t in dict(template).values())
    ids = set(_after_assistant(tokenizer))
    for name in END_OF_TURN:
        if name in text and (token := _single_token(tokenizer, name)) is not None:
            ids.add(token)
    return frozenset(ids)


def gguf_stop_ids(source: str | os.PathLike | Mapping) -> frozenset[int]:
    """The ids a GGUF declares as ending a generation (``GGUF_KEYS``): ``source`` is the file, or its metadata
    as llama-cpp-python's ``Llama.metadata`` gives it (strings).

    Raises:
        ValueError: a file that is not a readable GGUF.
    """
    if isinstance(source, Mapping):
        return frozenset(int(source[key]) for key in GGUF_KEYS if source.get(key) not in (None, ""))
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(source)).fields
    except Exception as err:  # the gguf package raises ValueError, struct errors, OSError...
        raise ValueError(f"{source}: not a readable GGUF file ({err})") from None
    ids = set()
    for key in GGUF_KEYS:
        field = fields.get(key)
        if field is not None and field.data:
            ids.add(int(field.parts[field.data[0]][0]))
    return frozenset(ids)


def _ids(value) -> set[int]:
    if value is None:
        return set()
    values = value if isinstance(value, list | tuple | set | frozenset) else [value]
    return {int(v) for v in values if v is not None and int(v) >= 0}


def _declaring(model_config) -> list:
    """The objects whose ``eos_token_id`` counts: the argument, and a model's generation config and config."""
    if model_config is None:
        return []
    return [model_config, getattr(model_config, "generation_config", None), getattr(model_config, "config", None)]


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {int(i) for i, token in added.items() if getattr(token, "special", False)}
    return ids


def _single_token(tokenizer, text: str) -> int | None:
    """The id of ``text`` when the tokenizer encodes it as one token, else None."""
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    except Exception:
        return None
    return int(ids[0]) if len(ids) == 1 else None


def _after_assistant(tokenizer) -> set[int]:
    """The special token the chat template writes right after an assistant message, if whitespace at most
    comes between them; empty when it writes none or cannot render a plain user / assistant chat."""
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _PROBE}]
    try:
        rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
        at = rendered.rfind(_PROBE)
        if at < 0:
            return set()
        tail = tokenizer(rendered[at + len(_PROBE) :], add_special_tokens=False)["input_ids"]
    except Exception:  # templates raise on chats they refuse (jinja's raise_exception)
        return set()
    special = _special_ids(tokenizer)
    for token in tail:
        if token in special:
            return {int(token)}
        if tokenizer.decode([token]).strip():
            return set()  # text before any special token: the template marks the end of a turn with no token
    return set()
