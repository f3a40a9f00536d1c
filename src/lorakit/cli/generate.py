"""Generate text from a model, with or without an adapter; tokens stream to the terminal.

The model computes in --precision (default auto: bf16-mixed on a CPU with native bf16 products, else fp32).
"""

from __future__ import annotations

import argparse
import sys

from .model_option import add_model_option, model_spec
from .precision_option import add_precision_option
from .weights_option import add_weights_option, apply_weights

HELP = "generate text (prompt or chat), base model or adapter"


def add_parser(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser, from_adapter=True)
    parser.add_argument("--adapter", help="adapter directory; omit for the base model")
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="raw text to continue")
    text.add_argument("--chat", help="a user message, rendered with the model's chat template")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    add_precision_option(parser)
    add_weights_option(parser)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    import lorakit
    from lorakit.precision import decide
    from lorakit.stopping import stop_token_ids

    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        raise ValueError("use --temperature >= 0, 0 < --top-p <= 1 and --max-new-tokens >= 1")
    precision = decide(args.precision, "cpu")  # refused before anything loads
    args.model = model_spec(args, args.adapter)
    model, tokenizer = lorakit.load_model(args.model, dtype=precision.storage)
    if tokenizer is None:
        raise ValueError(f"--model {args.model} has no tokenizer files")
    if args.adapter:
        lorakit.load_adapter(model, args.adapter, adapter_dtype=precision.trained)
    print(precision.describe(), file=sys.stderr)
    print(apply_weights(model, args.weights, "cpu", precision), file=sys.stderr)
    ids = prompt_ids(tokenizer, args.prompt, args.chat, args.system)
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    with torch.no_grad(), precision.context("cpu"):
        model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=args.max_new_tokens,
            do_sample=sample,
            temperature=args.temperature if sample else None,
            top_p=args.top_p if sample else None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            eos_token_id=sorted(stop_token_ids(tokenizer, model)) or None,  # the server's and evaluation's stops
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        )
    return 0


def prompt_ids(tokenizer, prompt: str | None, chat: str | None, system: str | None) -> list[int]:
    if prompt is not None:
        if not prompt:
            raise ValueError("--prompt is empty")
        return tokenizer(prompt)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use --prompt")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": chat}]
    from ..data import chat_prompt_ids

    return chat_prompt_ids(tokenizer, messages)
