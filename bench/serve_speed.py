"""lorakit serve against llama.cpp, side by side in one run: one stream's speed and 8 clients on 8 adapters.

    .venv/bin/python bench/serve_speed.py --adapter out/dates [--tokens 64] [--repeats 3] [--clients 8]
        [--prompts 4] [--modes serve-default,...] [--exact-match] [--json FILE] [--markdown FILE]

Prompts: the system and user turns of the first --prompts (one stream) and --clients (8 clients) rows of
examples/data/dates-eval.jsonl (the demo task), rendered by the tokenizer's chat template and sent as the same
token ids to every mode; greedy; exactly --tokens new tokens each (EOS ignored).

Modes (alternated round-robin over --repeats, the starting mode rotating; medians reported):
  serve-default      `lorakit serve` with no --precision / --weights flags: what a user gets (the banner's
                     precision and weights lines are recorded)
  serve-fp32         --precision fp32 --weights precision
  serve-bf16         --precision bf16-mixed --weights precision
  serve-int8         --precision bf16-mixed --weights int8 (int8 weight-only base layers)
  llama-q4_1+lora    llama.cpp (llama-cpp-python, in this process) on the untouched Q4_1 base GGUF with the
                     `lorakit export --format gguf-lora` file of the adapter
  llama-merged-q8_0  llama.cpp on the `lorakit export --format gguf --dtype q8_0` (merged) file
Each serve mode is one `lorakit serve` child process at a time (started, warmed up with 2 requests and one
burst of the clients at 8 tokens each, measured, stopped; never two at once) serving --clients copies of the adapter under the names d0, d1, ... (different names,
so the engine routes that many adapters). In it:
  one stream         the prompts one after another, streamed /v1/completions on d0 (the demo adapter);
                     TTFT = first streamed token - request sent (prompt processing and HTTP included);
                     ms/token = (last token - first token) / (tokens - 1); tokens/s = 1000 / that
  N clients          --clients concurrent streamed requests, client i on adapter di; aggregate tokens/s =
                     all generated tokens / (last answer - first send)
llama.cpp runs one stream only (n_threads and n_threads_batch = --threads): it applies an adapter to the
whole context and cannot batch requests on different adapters, so it has no N-client figure. Its TTFT includes
prompt processing too (no HTTP). The server gets OMP_NUM_THREADS = --threads.

Targets (issue 31 item 5), printed as PASS / MISS:
  serve-default one stream tokens/s / llama-q4_1+lora tokens/s >= 0.5
  serve-default N-client aggregate tokens/s / llama-q4_1+lora one-stream tokens/s >= 2
  --exact-match: `lorakit eval` (greedy, 12 new tokens) of each serve mode's precision and weights on all 200
  held-out rows, each no more than 1 point below fp32's (serve-default is evaluated with --precision auto
  --weights auto, which resolve as the server's defaults do; eval's own --weights default is precision).

Time on the idle 2-core box: about 20-30 s per serve mode and repeat at --tokens 64 (server start, warm-up, the
prompts, the clients) and a few seconds per llama.cpp mode, plus the two exports: about 5-7 minutes for the
defaults; --exact-match adds one `lorakit eval` of the 200 rows per serve mode (fp32 always, as the reference),
minutes each. --max-rows N limits the eval rows (for smoke tests; not the target's figure). Run it on an otherwise
idle machine: with more compute threads than free cores, torch's and ggml's threads wait on each other and both
slow down many times over (the script warns when the load average is above 0.5 at the start).

Reading it: the table's one-stream columns compare decode speed per token with llama.cpp; the N-client column is
what continuous batching across adapters gives in aggregate; the ratio lines say whether the targets hold on this
CPU (named in the header, with the torch and llama-cpp-python versions and the command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ stays off the path: no script here may shadow an installed package (a kernels.py once hid `kernels`)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from lorakit.fastpath import cpu_description  # noqa: E402

DATA = ROOT / "examples" / "data" / "dates-eval.jsonl"
SERVE_FLAGS = {
    "serve-default": [],
    "serve-fp32": ["--precision", "fp32", "--weights", "precision"],
    "serve-bf16": ["--precision", "bf16-mixed", "--weights", "precision"],
    "serve-int8": ["--precision", "bf16-mixed", "--weights", "int8"],
}
EVAL_FLAGS = {  # lorakit eval's flags for the same weights as each serve mode (eval defaults to --weights precision)
    "serve-default": ["--precision", "auto", "--weights", "auto"],
    **{mode: flags for mode, flags in SERVE_FLAGS.items() if flags},
}
LLAMA_MODES = ("llama-q4_1+lora", "llama-merged-q8_0")
MODES = (*SERVE_FLAGS, *LLAMA_MODES)
REFERENCE = "llama-q4_1+lora"
DEFAULT = "serve-default"


# ----- prompts ---------------------------------------------------------------------------------------------
def load_prompts(path: Path, count: int) -> list[list[int]]:
    """Token ids of the first ``count`` chat rows' system + user turns, the assistant turn opened."""
    from transformers import AutoTokenizer

    from lorakit.data import chat_prompt_ids
    from lorakit.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("default"))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(rows) < count:
        raise SystemExit(f"{path} has {len(rows)} rows; {count} prompts were asked for")
    prompts = []
    for row in rows[:count]:
        messages = [m for m in row["messages"] if m["role"] in ("system", "user")]
        prompts.append(chat_prompt_ids(tokenizer, messages))
    return prompts


# ----- lorakit serve ---------------------------------------------------------------------------------------
class Server:
    """`lorakit serve` with ``flags`` in a child process on a free local port, serving ``names`` (each the
    adapter ``adapter``); its stderr is kept (the banner says which precision and weights it chose)."""

    def __init__(self, flags: list[str], adapter: str, names: list[str], threads: int):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-m", "lorakit", "serve", "--port", str(self.port), *flags]
        for name in names:
            command += ["--adapter", f"{name}={adapter}"]
        if len(names) > 16:  # the server's default --max-batch-size
            command += ["--max-batch-size", str(len(names))]
        self.command = command
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
        started = time.perf_counter()
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                raise SystemExit(f"lorakit serve {' '.join(flags)} exited before it was ready:\n{self.stderr_tail()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).close()
                self.startup_s = time.perf_counter() - started
                return
            except OSError:
                time.sleep(0.25)
        self.close()
        raise SystemExit(f"lorakit serve {' '.join(flags)} was not ready after 300 s:\n{self.stderr_tail()}")

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def stderr_tail(self, count: int = 30) -> str:
        return "\n".join(self.lines[-count:])

    def banner(self) -> dict:
        """The banner's precision and weights lines (what the server chose and why)."""
        found = {}
        for line in self.lines:
            for key in ("precision", "weights"):
                if line.startswith(f"  {key}:") and key not in found:
                    found[key] = line.strip()
        return found

    def peak_rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def stream(self, model: str, ids: list[int], tokens: int) -> dict:
        """One streamed greedy completion of exactly ``tokens`` tokens; its times (perf_counter) and text."""
        body = {"model": model, "prompt": ids, "max_tokens": tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions", json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        stamps, text, generated = [], [], None
        sent = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                if not line.startswith(b"data: {"):
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                if "error" in event:
                    raise SystemExit(f"lorakit serve answered an error: {event['error']}\n{self.stderr_tail()}")
                if event.get("choices"):  # a token's text (some wait for the next token's bytes), or the finish
                    stamps.append(now)
                    text.append(event["choices"][0].get("text") or "")
                if event.get("usage"):
                    generated = event["usage"]["completion_tokens"]
        done = time.perf_counter()
        if generated != tokens:
            raise SystemExit(f"lorakit serve generated {generated} tokens for {model}, expected {tokens}")
        return {"sent": sent, "first": stamps[0], "last": stamps[-1], "done": done, "events": len(stamps),
                "tokens": generated, "text": "".join(text)}  # fmt: skip

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._reader.join(timeout=5)


def per_token(run: dict, tokens: int) -> dict:
    return {
        "ttft_ms": 1000 * (run["first"] - run["sent"]),
        "ms_per_token": 1000 * (run["last"] - run["first"]) / (tokens - 1),
        "events": run["events"],
    }


def serve_round(mode: str, args, prompts: list[list[int]], names: list[str]) -> dict:
    """One start-to-stop of the server in ``mode``: one stream over the prompts, then the N clients."""
    server = Server(SERVE_FLAGS[mode], args.adapter, names, args.threads)
    try:
        for name in names[:2] if len(names) > 1 else names * 2:  # warm-up: 2 requests
            server.stream(name, prompts[0], min(args.tokens, 8))
        jobs = [(names[i], prompts[i]) for i in range(args.clients)]
        with ThreadPoolExecutor(len(jobs)) as pool:  # and one burst of the clients (their shapes' first kernels)
            list(pool.map(lambda job: server.stream(job[0], job[1], min(args.tokens, 8)), jobs))
        single = []
        for ids in prompts[: args.prompts]:
            run = server.stream(names[0], ids, args.tokens)
            single.append({**per_token(run, args.tokens), "text": run["text"]})
        with ThreadPoolExecutor(len(jobs)) as pool:
            runs = list(pool.map(lambda job: server.stream(job[0], job[1], args.tokens), jobs))
        wall = max(r["done"] for r in runs) - min(r["sent"] for r in runs)
        total = sum(r["tokens"] for r in runs)
        clients = {
            "wall_s": wall,
            "tokens": total,
            "tokens_per_s": total / wall,
            "ttft_ms": [1000 * (r["first"] - r["sent"]) for r in runs],
        }
        return {"startup_s": server.startup_s, "banner": server.banner(), "single": single, "clients": clients,
                "peak_rss_mb": server.peak_rss_mb(), "command": shlex.join(server.command[1:])}  # fmt: skip
    finally:
        server.close()


# ----- llama.cpp -------------------------------------------------------------------------------------------
def llama_model(path: Path, lora: Path | None, threads: int):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), lora_path=None if lora is None else str(lora), n_ctx=512, n_threads=threads,
        n_threads_batch=threads, verbose=False,  # n_threads_batch (the prompt's) defaults to every CPU
    )  # fmt: skip


def llama_greedy(llm) -> int:
    """The argmax of the last evaluated token's logits. (llama-cpp-python 0.3's ``eval`` no longer copies logits
    into ``llm.scores`` unless the model was made with logits_all, so they are read from the context.)"""
    import numpy as np

    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def llama_stream(llm, ids: list[int], tokens: int) -> dict:
    """Greedy, exactly ``tokens`` tokens: the first after the prompt's evaluation, then tokens - 1 steps."""
    sent = time.perf_counter()
    llm.reset()
    llm.eval(ids)
    token = llama_greedy(llm)
    first = time.perf_counter()
    out = [token]
    for _ in range(tokens - 1):
        llm.eval([token])
        token = llama_greedy(llm)
        out.append(token)
    last = time.perf_counter()
    text = llm.detokenize(out).decode("utf-8", errors="replace")
    return {"sent": sent, "first": first, "last": last, "events": tokens, "text": text}


def llama_round(llm, args, prompts: list[list[int]]) -> dict:
    single = []
    for ids in prompts[: args.prompts]:
        run = llama_stream(llm, ids, args.tokens)
        single.append({**per_token(run, args.tokens), "text": run["text"]})
    return {"single": single}


# ----- exact match -----------------------------------------------------------------------------------------
def exact_match(mode: str, args) -> dict:
    """`lorakit eval` of the adapter on the held-out rows with ``mode``'s precision and weights."""
    command = [sys.executable, "-m", "lorakit", "eval", "--adapter", args.adapter, "--data", str(args.data), "--json",
               *EVAL_FLAGS[mode], "--max-new-tokens", "12", "--show", "0"]  # fmt: skip
    if args.max_rows:
        command += ["--max-rows", str(args.max_rows)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command[1:])} failed:\n{done.stderr[-3000:]}")
    record = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    chosen = [line.strip() for line in done.stderr.splitlines() if line.startswith(("precision:", "weights:"))]
    return {"exact_match": record["exact_match"], "scored": record["scored"], "loss": record["loss"],
            "seconds": time.perf_counter() - started, "chose": chosen, "command": shlex.join(command[1:])}  # fmt: skip


# ----- summary and table -----------------------------------------------------------------------------------
def summarize(raw: dict[str, list[dict]]) -> dict:
    summary = {}
    for mode, rounds in raw.items():
        if not rounds:
            continue
        single = [s for r in rounds for s in r["single"]]
        ms = statistics.median(s["ms_per_token"] for s in single)
        entry = {
            "ms_per_token": ms,
            "tokens_per_s": 1000 / ms,
            "ttft_ms": statistics.median(s["ttft_ms"] for s in single),
            "startup_s": statistics.median(r["startup_s"] for r in rounds),
            "sample": single[0]["text"],
        }
        if "clients" in rounds[0]:
            entry["clients_tokens_per_s"] = statistics.median(r["clients"]["tokens_per_s"] for r in rounds)
            entry["clients_ttft_ms"] = statistics.median(t for r in rounds for t in r["clients"]["ttft_ms"])
            entry["banner"] = rounds[0]["banner"]
            entry["peak_rss_mb"] = max((r["peak_rss_mb"] or 0) for r in rounds) or None
        summary[mode] = entry
    return summary


def targets(summary: dict, clients: int) -> list[dict]:
    out = []
    if DEFAULT in summary and REFERENCE in summary:
        ref = summary[REFERENCE]["tokens_per_s"]
        for what, value, goal in (
            (f"{DEFAULT} one stream / {REFERENCE} one stream (tokens/s)", summary[DEFAULT]["tokens_per_s"], 0.5),
            (f"{DEFAULT} {clients} clients on {clients} adapters aggregate / {REFERENCE} one stream (tokens/s)",
             summary[DEFAULT]["clients_tokens_per_s"], 2.0),
        ):  # fmt: skip
            out.append({"what": what, "ratio": value / ref, "target": goal, "pass": value / ref >= goal})
    return out


def describe_mode(mode: str, entry: dict) -> str:
    if mode in SERVE_FLAGS:
        banner = entry.get("banner", {})
        chose = "; ".join(banner.get(k, f"{k}: ?") for k in ("precision", "weights"))
        return f"{' '.join(SERVE_FLAGS[mode]) or '(no flags)'}: {chose}"
    return {
        "llama-q4_1+lora": "Q4_1 base GGUF + gguf-lora adapter",
        "llama-merged-q8_0": "adapter merged, q8_0 GGUF",
    }[mode]


def render(summary: dict, checks: list[dict], matches: dict, args, versions: dict) -> str:
    rows = f"first {args.max_rows}" if args.max_rows else "all"
    rows_label = f" ({rows} rows)" if matches else ""
    lines = [
        f"\n### lorakit serve against llama.cpp: one stream and {args.clients} clients on {args.clients} adapters "
        f"({datetime.date.today()})\n",
        f"Command: `{versions['command']}`; machine: {cpu_description()}, {args.threads} threads (server "
        f"OMP_NUM_THREADS, llama.cpp n_threads and n_threads_batch); torch {versions['torch']}, llama-cpp-python {versions['llama_cpp']}; "
        f"load average {versions['load']:.2f} at the start. "
        f"{args.prompts} chat prompts of the demo task (dates-eval.jsonl, the adapter {args.adapter}), greedy, "
        f"exactly {args.tokens} new tokens, {args.repeats} repeats with the modes alternated; medians. TTFT includes "
        "prompt processing (and HTTP for the server).\n",
        f"| mode | what | start (s) | TTFT (ms) | ms / token | tokens/s, one stream | tokens/s, {args.clients} clients "
        f"on {args.clients} adapters | exact match{rows_label} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fp32 = matches.get("serve-fp32", {}).get("exact_match")
    for mode, s in summary.items():
        clients = f"{s['clients_tokens_per_s']:.1f}" if "clients_tokens_per_s" in s else "n/a (see below)"
        match = "-"
        if mode in matches:
            em = matches[mode]["exact_match"]
            match = f"{100 * em:.1f}%" + (f" ({100 * (em - fp32):+.1f} vs fp32)" if fp32 is not None else "")
        lines.append(
            f"| {mode} | {describe_mode(mode, s)} | {s['startup_s']:.1f} | {s['ttft_ms']:.0f} | "
            f"{s['ms_per_token']:.1f} | {s['tokens_per_s']:.1f} | {clients} | {match} |"
        )
    lines.append("")
    if any(m in summary for m in LLAMA_MODES):
        lines.append(
            "llama.cpp applies an adapter to its whole context and cannot batch requests on different adapters, so "
            f"it has no {args.clients}-client figure; its start is the model (and adapter) load in this process.\n"
        )
    for check in checks:
        verdict = "PASS" if check["pass"] else "MISS"
        lines.append(f"- {check['what']}: **{check['ratio']:.2f}x** (target >= {check['target']}x): {verdict}")
    if not checks:
        lines.append(f"- targets: need both {DEFAULT} and {REFERENCE} in --modes")
    if matches:
        if fp32 is None:
            lines.append("- exact match: serve-fp32's reference is missing")
        for mode, m in matches.items():
            if mode == "serve-fp32" or fp32 is None:
                continue
            drop = 100 * (fp32 - m["exact_match"])
            verdict = "PASS" if drop <= 1.0 + 1e-9 else "MISS"
            lines.append(
                f"- exact match {mode}: {100 * m['exact_match']:.1f}% against fp32's {100 * fp32:.1f}% on "
                f"{m['scored']} rows (target: no more than 1 point below): {verdict}"
                + (" (a smoke run: --max-rows, not the target's 200 rows)" if args.max_rows else "")
            )
    return "\n".join(lines) + "\n"


# ----- main ------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="the demo adapter's directory (make demo: out/dates)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, each on its own adapter name")
    parser.add_argument("--prompts", type=int, default=4, help="prompts of the one-stream runs (default 4)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: the cores")
    parser.add_argument("--data", type=Path, default=DATA, help="chat rows (default examples/data/dates-eval.jsonl)")
    parser.add_argument("--exact-match", action="store_true", help="also lorakit eval each serve mode's weights")
    parser.add_argument("--max-rows", type=int, help="--exact-match on the first N rows only (smoke tests)")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--markdown", help="append the result table to this Markdown file")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes {args.modes}: use some of {', '.join(MODES)}")
    if args.tokens < 2 or args.repeats < 1 or args.clients < 1 or args.prompts < 1:
        parser.error("--tokens must be >= 2 and --repeats, --clients, --prompts >= 1")
    if not Path(args.adapter, "adapter_config.json").exists():
        parser.error(f"--adapter {args.adapter}: no adapter_config.json there (make demo writes out/dates)")
    import llama_cpp

    from lorakit.export import export_adapter
    from lorakit.models import default_gguf

    command = shlex.join([".venv/bin/python", "bench/serve_speed.py", *sys.argv[1:]])
    load = os.getloadavg()[0]
    versions = {"torch": torch.__version__, "llama_cpp": llama_cpp.__version__, "command": command, "load": load}
    if load > 0.5:
        print(
            f"warning: the 1-minute load average is {load:.2f}: other work is running. A server with more torch "
            "threads than free cores slows down many times over (its threads wait for each other), so figures "
            "taken now are not comparable",
            file=sys.stderr,
        )
    torch.set_num_threads(args.threads)
    prompts = load_prompts(args.data, max(args.prompts, args.clients))
    names = [f"d{i}" for i in range(args.clients)]
    raw: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        llamas = {}
        if "llama-q4_1+lora" in modes:
            lora = Path(tmp) / "adapter.gguf"
            print("exporting the adapter as gguf-lora ...", file=sys.stderr)
            export_adapter(args.adapter, lora, parity=False)
            llamas["llama-q4_1+lora"] = (default_gguf(), lora)
        if "llama-merged-q8_0" in modes:
            q8 = Path(tmp) / "merged-q8_0.gguf"
            print("exporting the merged q8_0 GGUF ...", file=sys.stderr)
            export_adapter(args.adapter, q8, fmt="gguf", dtype="q8_0", parity=False)
            llamas["llama-merged-q8_0"] = (q8, None)
        loaded = {}
        for mode, (path, lora) in llamas.items():
            started = time.perf_counter()
            loaded[mode] = llama_model(path, lora, args.threads)
            load_s = time.perf_counter() - started
            for _ in range(2):  # warm-up, as for the server
                llama_stream(loaded[mode], prompts[0], min(args.tokens, 8))
            loaded[mode] = (loaded[mode], load_s)
        for r in range(args.repeats):
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            for mode in order:
                print(f"round {r + 1}/{args.repeats}: {mode}", file=sys.stderr, flush=True)
                if mode in SERVE_FLAGS:
                    raw[mode].append(serve_round(mode, args, prompts, names))
                else:
                    llm, load_s = loaded[mode]
                    raw[mode].append({**llama_round(llm, args, prompts), "startup_s": load_s})
        loaded.clear()
    summary = summarize(raw)
    checks = targets(summary, args.clients)
    matches: dict[str, dict] = {}
    if args.exact_match:
        weight_modes = [m for m in SERVE_FLAGS if m in modes or m == "serve-fp32"]  # fp32 is the reference
        for mode in weight_modes:
            print(f"exact match: {mode} ...", file=sys.stderr, flush=True)
            matches[mode] = exact_match(mode, args)
    table = render(summary, checks, matches, args, versions)
    print(table)
    if args.json:
        payload = {"versions": versions, "cpu": cpu_description(), "args": {k: str(v) for k, v in vars(args).items()},
                   "summary": summary, "targets": checks, "exact_match": matches, "raw": raw}  # fmt: skip
        Path(args.json).write_text(json.dumps(payload, indent=2))
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
