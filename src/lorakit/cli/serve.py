"""Serve a base model and many adapters over an OpenAI-compatible HTTP API (FastAPI + uvicorn).

The request's `model` field picks the adapter; the base model's name means no adapter. Concurrent
requests on different adapters are batched into one forward pass per step.

--precision (``lorakit.precision.decide``; default auto: bf16-mixed where the hardware multiplies bf16
natively, else fp32): the base model is loaded in the precision's storage dtype, adapters in its trained dtype
(float32 under bf16-mixed), and every forward runs under its autocast context. On a CPU with AVX-512 BF16,
bf16-mixed decodes one stream 1.24x and eight streams 1.5x faster than fp32 (BENCHMARKS.md). ``--dtype`` is a
deprecated alias (float32 -> fp32, bfloat16 -> bf16, float16 -> fp16-mixed), with a one-line note.

--weights (``cli.weights_option``; default auto): int8 weight-only base layers under a bf16 precision on a CPU
with native bf16, else the precision's own weights; the banner says which. The engine decodes on the main
thread (``serve_forever``: uvicorn runs on a thread of its own), where the model was loaded: on a CPU its small
parallel products run faster there (BENCHMARKS.md, "Serving speed against llama.cpp").

Example:
    lorakit serve --model default --adapter dates=runs/dates/adapter --adapter-dir runs/adapters
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "dates", "prompt": "Convert 3 March 2021 to ISO format:", "max_tokens": 16}'
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .model_option import add_model_option
from .precision_option import add_precision_option
from .weights_option import add_weights_option, apply_weights

HELP = "serve the model and adapters over an OpenAI-compatible API"
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16-mixed"}  # --dtype (deprecated)


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_option(parser)
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an adapter to serve as model NAME (repeat for more)",
    )
    parser.add_argument("--adapter-dir", help="directory from which POST /v1/adapters may load adapters by name")
    parser.add_argument("--served-model-name", help="name of the base model in the API (default: from --model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request but /health")
    parser.add_argument("--max-batch-size", type=int, default=16, help="most requests decoded together")
    parser.add_argument("--max-queue", type=int, default=64, help="most waiting requests; more get HTTP 429")
    parser.add_argument("--max-tokens", type=int, default=512, help="most new tokens one request may ask for")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take in all")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted")
    add_precision_option(parser)
    add_weights_option(parser)
    parser.add_argument(
        "--dtype", choices=tuple(DTYPE_ALIASES), help="deprecated: use --precision (float32 = fp32, bfloat16 = bf16)"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--adapter {spec!r}: write NAME=DIR, for example --adapter dates=runs/dates/adapter")
        pairs.append((name, directory))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"--adapter names repeat: {names}; give each adapter its own name")
    return pairs


def precision_name(args: argparse.Namespace) -> str:
    """The precision the arguments ask for: --precision, or the deprecated --dtype's equivalent (with a one-line
    note). Raises ValueError for --dtype beside a --precision other than auto."""
    if args.dtype is None:
        return args.precision
    if args.precision != "auto":
        raise ValueError(f"--dtype is replaced by --precision; give only --precision (--precision {args.precision})")
    name = DTYPE_ALIASES[args.dtype]
    print(f"lorakit serve: --dtype is deprecated; --dtype {args.dtype} is --precision {name}", file=sys.stderr)
    return name


def base_model_name(spec: str) -> str:
    """The base model's name in the API: a Hub model's id (as vLLM names it), else the file or directory name."""
    from ..hub import parse

    if spec == "default":
        return "SmolLM2-135M-Instruct"
    if (named := parse(spec)) is not None:
        return named.repo
    path = Path(spec)
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models import load_model
    from ..precision import decide
    from ..serve.api import ServeLimits, create_app
    from ..serve.engine import Engine
    from ..serve.registry import AdapterRegistry

    for flag in ("max_batch_size", "max_tokens", "port"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_queue < 0 or args.timeout <= 0:
        raise ValueError("--max-queue must be >= 0 and --timeout > 0")
    adapters = parse_adapters(args.adapter)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    precision = decide(precision_name(args), device)  # refused before anything loads
    model, tokenizer = load_model(args.model, dtype=precision.storage)
    if tokenizer is None:
        raise ValueError(f"--model {args.model} has no tokenizer files; the server needs them")
    model.to(device)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_queue=args.max_queue, precision=precision)
    name = args.served_model_name or base_model_name(args.model)
    registry = AdapterRegistry(model, engine, name, args.adapter_dir, adapter_dtype=precision.trained)
    for adapter_name, directory in adapters:
        try:
            registry.load_at_start(adapter_name, directory)
        except Exception as err:
            raise ValueError(f"--adapter {adapter_name}={directory}: {err}") from None
    weights = apply_weights(model, args.weights, device, precision)  # adapters loaded later go beside the int8 base too
    limits = ServeLimits(max_tokens=args.max_tokens, timeout_s=args.timeout, max_body_bytes=args.max_body_bytes)
    context = getattr(model.config, "max_position_embeddings", None)
    app = create_app(engine, registry, tokenizer, limits=limits, api_key=args.api_key, context_length=context)
    listed = ", ".join(registry.names()) or "none"
    engine.decode_step()  # built now (after the weights are final) so that the banner says how it decodes
    print(
        f"lorakit serve: {name} on {device} with adapters: {listed}\n  {precision.describe()}\n  {weights}\n"
        f"  decode: {engine.decode_path}\n"
        f"  OpenAI API at http://{args.host}:{args.port}/v1 (Ctrl-C stops)",
        file=sys.stderr,
        flush=True,
    )
    serve_forever(app, engine, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def serve_forever(app, engine, *, host: str, port: int, log_level: str) -> None:
    """HTTP on a thread of its own (uvicorn), the engine's loop on this, the main, thread, which loaded the model:
    on a CPU its small parallel products run faster there than on a second thread (BENCHMARKS.md, serving).
    Ctrl-C (SIGINT) or SIGTERM answers what is in flight (503), then uvicorn shuts down gracefully; both are
    handled even when the server was started with SIGINT ignored."""
    import signal
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, name="lorakit-http", daemon=True)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # SIGINT too: a server started from a non-interactive shell's background job inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt for it (kill -INT, or a supervisor's SIGINT, did nothing)
    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    engine.reserve_caller_thread()  # before the app's lifespan (on the HTTP thread) asks the engine to start
    http.start()
    try:
        engine.run_here(until=lambda: not http.is_alive())
    except KeyboardInterrupt:
        engine.fail_all("the server is shutting down")
    finally:
        server.should_exit = True
        http.join(timeout=15)
        engine.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
