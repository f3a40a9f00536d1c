"""A local web dashboard: launch, watch and compare runs, chat with the base model and the adapters.

Every run under --runs is listed with its state (running, finished, failed, interrupted and resumable),
its curves (live while it trains) and its adapter; the New run form writes a config and starts
`lorakit train` as a child process. Paths are confined to --runs and its data directory.

    lorakit ui --runs runs                 # http://127.0.0.1:7860
    lorakit ui --runs runs --host 0.0.0.0 --token "$(openssl rand -hex 16)"
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from .model_option import add_model_option

HELP = "local web dashboard: launch, watch and compare runs, chat with adapters"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--runs", default="runs", help="directory of run directories (default runs; created)")
    parser.add_argument("--data", help="data directory runs may read (default: RUNS/data; created)")
    add_model_option(parser, what="base model for chat and new runs")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--token", default=os.environ.get("LORAKIT_UI_TOKEN"),
        help="required on every request (default: $LORAKIT_UI_TOKEN); needed when --host is not a loopback address",
    )  # fmt: skip
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..ui import Workspace, create_app

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: use 1-65535")
    if not is_loopback(args.host) and not args.token:
        raise ValueError(
            f"--host {args.host} lets other machines reach the dashboard, which starts processes and reads your "
            "runs: give --token SECRET (or set LORAKIT_UI_TOKEN), or bind --host 127.0.0.1"
        )
    if args.token is not None and len(args.token) < 8:
        raise ValueError("--token is shorter than 8 characters; use a long random one (openssl rand -hex 16)")
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else runs / "data"
    data.mkdir(parents=True, exist_ok=True)
    ws = Workspace(runs, data)
    app = create_app(ws, args.model, token=args.token, host=args.host)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{args.port}/" + (f"?token={args.token}" if args.token else "")
    print(f"lorakit ui: runs in {ws.root}, data in {ws.data_dir}, model {args.model}\n  open {url}  (Ctrl-C stops)",
          file=sys.stderr, flush=True)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
