"""`lorakit compare`: LoRA against full fine-tuning, adapter layers and prompt tuning, measured side by side.

Every method trains with the same model, data, seed, step budget, batch and precision (the run config's
``precision``; one learning rate per method), through the same trainer, each in a fresh process so that its
peak memory is its own. The parent collects one JSON record per method and writes results.json, results.md
and results.png.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .. import durable
from ..methods import METHODS
from ..precision import Precision, decide
from ..train.config import RunConfig

RESULT_NAME = "result.json"
FIELDS = [
    "method", "status", "trainable_params", "total_params", "trainable_percent", "peak_memory_mb", "memory_kind",
    "median_step_seconds", "tokens_per_second", "eval_loss", "exact_match", "exact_match_before", "artifact_bytes",
    "latency_vs_base", "latency_merged_vs_base", "base_weights_changed", "retention_kept", "retention_kl",
    "retention_top1", "seed", "steps", "lr", "precision", "wall_seconds", "error",
]  # fmt: skip
SPREAD = ["exact_match", "eval_loss", "retention_kept", "retention_kl", "retention_top1", "median_step_seconds",
          "peak_memory_mb"]  # fmt: skip


def check_methods(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or names}: choose from {', '.join(METHODS)} (comma-separated)")
    return names


def method_lr(cfg: RunConfig, name: str) -> float:
    c = cfg.compare
    return {"full": c.lr_full, "adapter": c.lr_adapter, "prompt": c.lr_prompt}.get(name) or c.lr_lora or cfg.train.lr


def build_method(cfg: RunConfig, name: str, tokenizer=None):
    c = cfg.compare
    if name == "adapter":
        return METHODS["adapter"](size=c.adapter_size)
    if name == "prompt":
        return METHODS["prompt"](length=c.prompt_length, init_text=c.prompt_init_text, tokenizer=tokenizer)
    if name == "lora":
        return METHODS["lora"](cfg.lora)
    return METHODS[name]()


# ----- the parent: one worker process per method -----------------------------------------------------------
def run_compare(cfg: RunConfig, methods: list[str], progress: bool = True) -> list[dict[str, Any]]:
    """Run every method (``compare.seeds`` times, seeds ``seed``, ``seed + 1``, ...) each in its own process;
    return (and write) their records, one per method and seed."""
    check_methods(methods)
    if cfg.objective != "sft":
        raise ValueError(
            f"lorakit compare measures supervised fine-tuning; objective={cfg.objective} has a reference model only "
            "for LoRA (the adapter switched off): use objective=sft, or lorakit train for preference tuning"
        )
    if cfg.compare.seeds < 1:
        raise ValueError(f"compare.seeds must be >= 1, got {cfg.compare.seeds}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / "compare-config.yaml"
    data = cfg.to_dict()
    data["compare"]["methods"] = methods  # the worker of the first one also measures the untrained base
    durable.write_text(resolved, yaml.safe_dump(data, sort_keys=False))
    seeds = [cfg.seed + k for k in range(cfg.compare.seeds)]
    runs = [(name, seed) for name in methods for seed in seeds]
    records = []
    for k, (name, seed) in enumerate(runs, start=1):
        label = name if len(seeds) == 1 else f"{name}, seed {seed}"
        print(f"[{k}/{len(runs)}] {label}: training in a fresh process...", file=sys.stderr, flush=True)
        where = out / name if len(seeds) == 1 else out / name / f"seed-{seed}"
        records.append(_run_worker(resolved, name, where, progress, seed))
        r = records[-1]
        summary = (f"exact match {_pct(r.get('exact_match'))}{_retention_note(r)}, step "
                   f"{r['median_step_seconds']:.2f} s" if r["status"] == "ok" else f"FAILED: {r['error']}")  # fmt: skip
        print(f"[{k}/{len(runs)}] {label}: {summary}", file=sys.stderr, flush=True)
    write_outputs(records, out)
    return records


def _retention_note(r: dict[str, Any]) -> str:
    return "" if r.get("retention_kept") is None else f", retention {_pct(r['retention_kept'])}"


def _run_worker(config: Path, name: str, out: Path, progress: bool, seed: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "lorakit.tools.compare", str(config), name, str(out), f"--seed={seed}"] + (
        [] if progress else ["--quiet"]
    )
    started = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    result_file = out / RESULT_NAME
    if done.returncode == 0 and result_file.is_file():
        return json.loads(result_file.read_text())
    error = _last_error(out) or f"worker exited with status {done.returncode}"
    return {"method": name, "seed": seed, "status": "failed", "error": error,
            "wall_seconds": time.perf_counter() - started}  # fmt: skip


def _last_error(out: Path) -> str | None:
    path = out / "error.txt"
    return path.read_text().strip() if path.is_file() else None


# ----- the worker: train one method and measure it ---------------------------------------------------------
class _Recording:
    """Wraps a method to checksum the base weights it receives, before training touches them."""

    def __init__(self, method) -> None:
        self.method, self.name = method, method.name
        self.originals: list[nn.Parameter] = []
        self.checksum_before = ""

    def prepare(self, model: nn.Module) -> nn.Module:
        self.originals = list(model.parameters())
        self.checksum_before = checksum(self.originals)
        return self.method.prepare(model)

    def save(self, trained, directory):
        return self.method.save(trained, directory)

    def restore(self, prepared, directory):
        return self.method.restore(prepared, directory)


def checksum(params: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def worker(config_path: Path, name: str, out: Path, progress: bool, seed: int | None = None) -> dict[str, Any]:
    from ..train.config import from_dict
    from ..train.trainer import train

    data = yaml.safe_load(config_path.read_text())
    cfg = from_dict(RunConfig, data, "")
    first_seed = cfg.seed
    cfg.seed = first_seed if seed is None else seed
    lr = method_lr(cfg, name)
    cfg.output_dir, cfg.overwrite = str(out), True
    cfg.train.lr, cfg.train.save_every, cfg.train.eval_every = lr, 0, 0
    cfg.train.eval_retention = False  # measured below for every method alike, against a freshly loaded base
    cfg.train.eval_before = name == cfg.compare.methods[0] and cfg.seed == first_seed
    from ..models import load_model

    _, tokenizer = load_model(cfg.model, skeleton=True)  # a skeleton reads no weights: the peak stays training's
    method = _Recording(build_method(cfg, name, tokenizer))
    started = time.perf_counter()
    result = train(cfg, progress=progress, method=method)
    peak_mb = _peak_memory_mb()
    trained = result.model
    record = {
        "method": name, "seed": cfg.seed, "status": "ok", "lr": lr, "steps": result.steps,
        "peak_memory_mb": peak_mb, "memory_kind": "peak CUDA allocated" if torch.cuda.is_available() else "peak RSS",
        **_counts(trained), **_step_stats(out / "metrics.jsonl"),
        "eval_loss": result.eval.loss if result.eval else None,
        "exact_match": result.eval.exact_match if result.eval else None,
        "exact_match_before": result.eval_before.exact_match if result.eval_before else None,
        "artifact_bytes": _artifact_bytes(out),
        "base_weights_changed": checksum(method.originals) != method.checksum_before,
    }  # fmt: skip
    precision = decide(cfg.precision, next(trained.parameters()).device)  # as the trainer decided it
    record["precision"] = precision.name
    device = next(trained.parameters()).device
    base, base_tokenizer = load_model(cfg.model, dtype=precision.storage)  # after the peak was read
    base.to(device)
    record.update(_latency(cfg, trained, name, precision, base, base_tokenizer))
    if cfg.compare.retention:
        record.update(_retention(cfg, base, trained, base_tokenizer, precision, progress))
    record["wall_seconds"] = time.perf_counter() - started
    return record


def _retention(cfg: RunConfig, base: nn.Module, trained: nn.Module, tokenizer, precision: Precision, progress: bool):
    """How much of the base's general behaviour the trained model kept (``lorakit.train.retention``; the sets of
    ``data.retention_texts`` / ``data.retention_probes``, else the shipped ones)."""
    from ..train.retention import load_probes, load_texts, measure_retention

    texts, probes = load_texts(cfg.data.retention_texts), load_probes(cfg.data.retention_probes)
    with precision.context(next(trained.parameters()).device):
        report = measure_retention(base, trained, tokenizer, texts, probes, progress=progress)
    return {"retention_kept": report.kept_share, "retention_kl": report.kl, "retention_top1": report.agreement}


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    from .benchmark import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def _counts(model: nn.Module) -> dict[str, Any]:
    from ..adapters import trainable_summary

    s = trainable_summary(model)
    return {"trainable_params": s.trainable, "total_params": s.total, "trainable_percent": s.percent}


def _step_stats(metrics: Path) -> dict[str, float]:
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if '"kind": "train"' in line]
    timed = steps[1:] or steps  # the first step pays one-off costs
    seconds = [s["seconds"] for s in timed]
    return {
        "median_step_seconds": statistics.median(seconds),
        "tokens_per_second": sum(s["tokens"] for s in timed) / sum(seconds),
    }


def _artifact_bytes(out: Path) -> int:
    bookkeeping = {"config.yaml", "metrics.jsonl", "loss.png", "status.json", RESULT_NAME, "error.txt"}
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file() and p.name not in bookkeeping)


def _latency(
    cfg: RunConfig, trained: nn.Module, name: str, precision: Precision, base: nn.Module, tokenizer
) -> dict[str, float | None]:
    """Median forward time of the trained model over a fresh base model's (``base``), same batch, same process,
    both in the run's ``precision`` (the base stored as training stored it, the forwards under its autocast)."""
    from .. import adapters
    from ..data import EVAL_SPLITS, TRAIN_SPLITS, read_rows, tokenize_rows
    from ..train.evaluate import pad_id

    device = next(trained.parameters()).device
    source, splits = (cfg.data.eval, EVAL_SPLITS) if cfg.data.eval else (cfg.data.train, TRAIN_SPLITS)
    rows = read_rows(source, cfg.data.columns, splits=splits, log=lambda message: None)[:8]  # read before: quiet
    batch = _collated(tokenize_rows(rows, tokenizer, cfg.data.max_length, True)[0], pad_id(tokenizer), device)
    repeats = cfg.compare.latency_repeats
    base_time = _time_forward(base, batch, repeats, precision)
    result: dict[str, float | None] = {
        "latency_vs_base": _time_forward(trained, batch, repeats, precision) / base_time,
        "latency_merged_vs_base": None,
    }
    if name == "lora":
        adapters.merge(trained)  # outside autocast: the merge's own maths stay in the weights' dtype
        merged_time = _time_forward(trained, batch, repeats, precision)
        result["latency_merged_vs_base"] = merged_time / _time_forward(base, batch, repeats, precision)
        adapters.unmerge(trained)
    return result


def _collated(examples, pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    from ..data import collate

    batch = collate(examples, pad)
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


@torch.no_grad()
def _time_forward(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int, precision: Precision) -> float:
    """Median seconds of ``model``'s forward on ``batch`` in ``precision``, after one warm-up."""
    model.eval()
    times = []
    with precision.context(batch["input_ids"].device):
        model(**batch)  # warm-up
        for _ in range(max(1, repeats)):
            started = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


# ----- outputs -----------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _loss(x: float | None) -> str:
    return "n/a (no eval rows)" if x is None else f"{x:.4f}"


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


LABELS = {"full": "full fine-tuning", "adapter": "adapter layers", "prompt": "prompt tuning", "lora": "LoRA"}


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per method over its seeds: the first run's fields, and for every ``SPREAD`` field its mean
    (``key``), sample standard deviation (``key_sd``, None for one run) and range (``key_min``, ``key_max``)
    over the runs that finished; ``runs`` / ``seeds`` say how many and which."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    summary = []
    for runs in by_method.values():
        ok = [r for r in runs if r["status"] == "ok"]
        row = dict(ok[0] if ok else runs[0])
        row.update(runs=len(ok), seeds=[r.get("seed") for r in runs])
        if not ok:
            summary.append(row)
            continue
        row["status"] = "ok"
        for key in SPREAD:
            values = [r[key] for r in ok if r.get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
            row[f"{key}_min"], row[f"{key}_max"] = (min(values), max(values)) if values else (None, None)
        row["base_weights_changed"] = any(r.get("base_weights_changed") for r in ok)
        failed = [r for r in runs if r["status"] != "ok"]
        row["error"] = f"{len(failed)} of {len(runs)} runs failed: {failed[0].get('error')}" if failed else None
        summary.append(row)
    return summary


def _spread(r: dict[str, Any], key: str, show) -> str:
    """``mean ± sd`` over the seeds (``show`` formats one value), or the value alone for one run."""
    if r.get(key) is None:
        return "n/a"
    sd = r.get(f"{key}_sd")
    return show(r[key]) if sd is None else f"{show(r[key])} ± {show(sd).rstrip('%').strip()}"


def _kl_text(x: float) -> str:
    return f"{x:.3f}"


def markdown_table(records: list[dict[str, Any]]) -> str:
    rows = summarize(records)
    seeds = max((r["runs"] for r in rows), default=1)
    retention = any(r.get("retention_kept") is not None for r in rows)
    head = ("| method | trainable parameters | peak memory | median step | tokens/s | eval loss | exact match "
            + ("| retention (probes kept) | drift (KL nats/token) " if retention else "")
            + "| artifact | inference vs base | modifies the pretrained model |")  # fmt: skip
    columns = head.count("|") - 1
    lines = [head, "|" + "---|" * columns]
    for r in rows:
        label = LABELS.get(r["method"], r["method"])
        if r["status"] != "ok":
            lines.append(f"| {label} | failed: {(r.get('error') or '')[:120]} |" + " |" * (columns - 2))
            continue
        latency = f"{r['latency_vs_base']:.2f}x"
        if r.get("latency_merged_vs_base") is not None:
            latency += f" ({r['latency_merged_vs_base']:.2f}x merged)"
        kept = (f"| {_spread(r, 'retention_kept', _pct)} | {_spread(r, 'retention_kl', _kl_text)} "
                if retention else "")  # fmt: skip
        lines.append(
            f"| {label} | {r['trainable_params']:,} ({r['trainable_percent']:.2f} %) | {r['peak_memory_mb']:,.0f} MB "
            f"| {r['median_step_seconds']:.2f} s | {r['tokens_per_second']:.0f} | {_spread(r, 'eval_loss', _loss)} "
            f"| {_spread(r, 'exact_match', _pct)} {kept}| {_size(r['artifact_bytes'])} | {latency} "
            f"| {'yes' if r['base_weights_changed'] else 'no'} |"
        )
    if seeds > 1:
        used = sorted({s for r in rows for s in r.get("seeds", []) if s is not None})
        lines.append(
            f"\nEach method trained {seeds} times (seeds {', '.join(map(str, used))}): eval loss, exact match and "
            "retention are the mean ± the sample standard deviation over the seeds; peak memory and median step "
            "are means over the seeds; tokens/s and latency are the first seed's run."
        )
    before = next((r["exact_match_before"] for r in records if r.get("exact_match_before") is not None), None)
    if before is not None:
        lines.append(f"\nBase model before training: exact match {_pct(before)}.")
    if retention:
        lines.append(
            "\nRetention: of the shipped general-knowledge probes the base model answers right, the share the "
            "trained model still answers right; drift: mean KL(base || trained) of the next-token distributions "
            "on the shipped general text (lorakit eval --retention)."
        )
    precisions = sorted({r["precision"] for r in records if r.get("precision")})
    if precisions:
        lines.append(f"\nPrecision: {', '.join(precisions)} (the run config's precision, for every method).")
    return "\n".join(lines) + "\n"


def write_outputs(records: list[dict[str, Any]], out: Path) -> None:
    durable.write_many(
        {
            out / "results.json": (
                json.dumps([{k: r.get(k) for k in FIELDS} for r in records], indent=2) + "\n"
            ).encode(),
            out / "results.md": markdown_table(records).encode(),
        }
    )
    chart(records, out / "results.png")
    print(markdown_table(records))
    print(f"results: {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")


def chart(records: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in summarize(records) if r["status"] == "ok"]
    panels = [("trainable_percent", "trainable share (%)", True), ("peak_memory_mb", "peak memory (MB)", False),
              ("median_step_seconds", "median step (s)", False), ("exact_match", "exact match (%)", False)]  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4), dpi=110)
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        values = [(r[key] or 0) * (100 if key == "exact_match" else 1) for r in ok]
        ax.bar([LABELS.get(r["method"], r["method"]).replace(" ", "\n") for r in ok], values, color="tab:blue")
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("lorakit compare: same model, data, seed, steps and batch")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _worker_main(argv: list[str]) -> int:
    config, name, out = Path(argv[0]), argv[1], Path(argv[2])
    seed = next((int(a.split("=", 1)[1]) for a in argv[3:] if a.startswith("--seed=")), None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.txt").unlink(missing_ok=True)
    try:
        record = worker(config, name, out, progress="--quiet" not in argv, seed=seed)
    except Exception as err:  # reported in the table; the other methods still run
        durable.write_text(out / "error.txt", f"{type(err).__name__}: {err}")
        raise
    durable.write_text(out / RESULT_NAME, json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(_worker_main(sys.argv[1:]))
