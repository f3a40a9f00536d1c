"""Evaluation under torchrun: every process scores its share of the rows, the sums are added, and each process
gets one process's figures, with the model replicated (DDP) and sharded (FSDP, every forward in lockstep).

The worker half of the test runs as ``python -m tests.test_eval_ddp MODEL ADAPTER ROWS PAIRS OUT`` under
torch.distributed.run (gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 2  # rows (pairs) per forward: several forwards per process, and a last one short
SETTINGS = ["objective=dpo", "dpo.beta=0.5", "dpo.sft_weight=0.5"]


def _load(model_dir, adapter_dir, rows_path, pairs_path):
    """(model with the adapter, tokenizer, eval rows, eval pairs, DPO objective), the same in every process."""
    import lorakit
    from lorakit.data import read_rows, tokenize_pairs, tokenize_rows
    from lorakit.train.config import load_config
    from lorakit.train.objectives import DPO

    model, tokenizer = lorakit.load_model(str(model_dir))
    lorakit.load_adapter(model, adapter_dir)
    model.eval()
    examples, _ = tokenize_rows(read_rows(rows_path), tokenizer, 64, True)
    pairs, _ = tokenize_pairs(read_rows(pairs_path), tokenizer, 64)
    objective = DPO(load_config(None, [f"model={model_dir}", *SETTINGS]))
    return model, tokenizer, examples, pairs, objective


def _figures(model, tokenizer, examples, pairs, objective, **where) -> dict:
    from lorakit.train.evaluate import evaluate
    from lorakit.train.objectives import evaluate_pairs

    sft = evaluate(model, tokenizer, examples, batch_size=BATCH, max_new_tokens=4, samples=2, **where)
    pref = evaluate_pairs(objective, model, pairs, tokenizer.pad_token_id, BATCH, **where)
    return {"sft": sft.as_record(), "samples": sft.samples, "pairs": pref.as_record()}


def _worker(model_dir: str, adapter_dir: str, rows_path: str, pairs_path: str, out: str) -> None:
    from lorakit.train import distributed as dist
    from lorakit.train import fsdp

    ctx = dist.setup("cpu")
    model, tokenizer, examples, pairs, objective = _load(model_dir, adapter_dir, rows_path, pairs_path)
    record = {"ddp": _figures(model, tokenizer, examples, pairs, objective, ctx=ctx)}
    fsdp.shard(model, ctx.device)
    record["fsdp"] = _figures(model, tokenizer, examples, pairs, objective, ctx=ctx, lockstep=True)
    Path(out, f"rank{ctx.rank}.json").write_text(json.dumps(record))
    dist.teardown(ctx)


def _trained_adapter(tiny_lm_dir, tmp_path, examples_path) -> Path:
    """An adapter (LoRA and a modules_to_save head) trained until some answers are right and some wrong."""
    import lorakit
    from lorakit.data import collate, read_rows, tokenize_rows
    from lorakit.train.evaluate import token_loss_sum

    torch.manual_seed(0)
    model, tokenizer = lorakit.load_model(str(tiny_lm_dir))
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    lorakit.inject(model, config)
    examples, _ = tokenize_rows(read_rows(examples_path), tokenizer, 64, True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for step in range(40):
        batch = collate(examples[step % 4 * 8 : step % 4 * 8 + 8], tokenizer.pad_token_id)
        loss, n = token_loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_two_processes_evaluate_as_one_replicated_and_sharded(tiny_lm_dir, tmp_path):
    from .conftest import colour_rows, free_port, write_jsonl
    from .test_preference import preference_rows

    adapter = _trained_adapter(tiny_lm_dir, tmp_path, write_jsonl(tmp_path / "train.jsonl", colour_rows(32)))
    rows = write_jsonl(tmp_path / "rows.jsonl", colour_rows(11, seed=3))  # 6 rows on rank 0, 5 on rank 1
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(9, seed=4))
    loaded = _load(tiny_lm_dir, adapter, rows, pairs)
    want = _figures(*loaded)
    assert 0 < want["sft"]["exact_match"] < 1, "the check needs both hits and misses"
    assert want["sft"]["scored"] == 11 and want["pairs"]["pairs"] == 9 and len(want["samples"]) == 2

    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "tests.test_eval_ddp", str(tiny_lm_dir), str(adapter), str(rows), str(pairs), str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-12000:]
    for rank in (0, 1):
        got = json.loads((out / f"rank{rank}.json").read_text())
        for mode in ("ddp", "fsdp"):
            for kind in ("sft", "pairs"):
                a, b = want[kind], got[mode][kind]
                assert a.keys() == b.keys(), (mode, kind)
                for key, value in a.items():
                    if key in ("loss", "perplexity") or kind == "pairs":
                        assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (rank, mode, kind, key, a, b)
                    else:  # exact match, scored rows: exactly
                        assert b[key] == value, (rank, mode, kind, key, a, b)
            # the sample answers: the main process's alone, unless every process runs the forwards (FSDP)
            samples = [list(s) for s in want["samples"]]
            assert got[mode]["samples"] == (samples if rank == 0 or mode == "fsdp" else []), (rank, mode)


def test_a_ddp_run_records_one_process_evaluation_of_its_adapter(run_config, tmp_path):
    """Each eval record of a 2-process run is the evaluation of all the held-out rows: the last one equals one
    process's evaluation of the adapter the run saved."""
    import lorakit
    from lorakit.train.evaluate import evaluate
    from lorakit.train.run_data import prepare_data

    from .conftest import torchrun_train

    cfg = run_config("train.max_steps=2", "train.eval_every=1", "train.eval_batch_size=3", out="ddp")
    done = torchrun_train(cfg.to_dict(), tmp_path)
    assert done.stderr.count("eval after training") == 1  # printed by rank 0 alone
    lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["kind"] == "eval"]
    assert [r["step"] for r in records] == [0, 1, 2]
    model, tokenizer = lorakit.load_model(cfg.model)
    lorakit.load_adapter(model, cfg.output_dir)
    _, held, _ = prepare_data(cfg, tokenizer)
    want = evaluate(model, tokenizer, held, max_new_tokens=cfg.train.max_new_tokens, samples=0)
    assert records[-1]["scored"] == want.scored == 12
    assert records[-1]["exact_match"] == want.exact_match
    assert records[-1]["loss"] == pytest.approx(want.loss, rel=1e-5)


if __name__ == "__main__":
    _worker(*sys.argv[1:6])
