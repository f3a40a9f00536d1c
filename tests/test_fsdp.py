"""`train.strategy: fsdp`: FSDP2 sharded LoRA training under torchrun (gloo on CPU), against one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorakit
from lorakit.cli.main import main
from lorakit.precision import _fixed
from lorakit.train.trainer import train

from .conftest import free_port, torchrun_train


def _adapter(directory) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


FSDP = ("train.strategy=fsdp", "train.grad_accum=2", "train.max_steps=4", "train.eval_every=2")


def test_fsdp_gives_the_adapter_of_one_process(run_config, tmp_path, tiny_lm_dir):
    single = train(run_config(*FSDP, out="single"), progress=False)  # strategy is ignored in one process
    cfg = run_config(*FSDP, out="fsdp").to_dict()
    done = torchrun_train(cfg, tmp_path)
    assert "fsdp: 2 processes" in done.stderr and done.stderr.count("trainable params") == 1
    assert done.stdout.count("adapter written to") == 1  # the summary from rank 0 alone
    assert _max_diff(_adapter(single.output_dir), _adapter(cfg["output_dir"])) <= 1e-5
    # the eval metrics every rank computed in step, written once
    records = [
        line for line in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
    ]
    assert len(records) == 3  # before, at step 2, after
    # loadable without torch.distributed, by lorakit and by PEFT
    model, _ = lorakit.load_model(tiny_lm_dir)
    lorakit.load_adapter(model, cfg["output_dir"])
    from peft import PeftModel

    base, _ = lorakit.load_model(tiny_lm_dir)
    PeftModel.from_pretrained(base, cfg["output_dir"])


def test_fsdp_config_errors_are_one_line(run_config, tmp_path, capsys):
    with pytest.raises(ValueError, match="train.strategy=fsdp with quantize=nf4: FSDP cannot shard"):
        run_config("train.strategy=fsdp", "quantize=nf4")
    with pytest.raises(ValueError, match=r"train.strategy='zero3': use one of \['ddp', 'fsdp'\]"):
        run_config("train.strategy=zero3")
    with pytest.raises(ValueError, match="train.strategy=fsdp with precision=fp16-mixed: the loss scaler's"):
        run_config("train.strategy=fsdp", "precision=fp16-mixed")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"train": {"strategy": "fsdp"}, "lora": {"init": "pissa"}}))
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.strategy=fsdp with lora.init=pissa" in err[0]


@pytest.mark.slow
def test_fsdp_with_gradient_checkpointing_gives_the_adapter_of_one_process(run_config, tmp_path):
    settings = (*FSDP, "train.gradient_checkpointing=true", "train.generate_eval=false")
    single = train(run_config(*settings, out="single"), progress=False)
    cfg = run_config(*settings, out="fsdp-gc").to_dict()
    torchrun_train(cfg, tmp_path)
    a, b = _adapter(single.output_dir), _adapter(cfg["output_dir"])
    print({k: round((a[k] - b[k]).abs().max().item(), 6) for k in a})
    assert _max_diff(a, b) <= 1e-5


ROOT = Path(__file__).resolve().parents[1]


def _driven(cfg: dict, tmp_path, delay: float) -> subprocess.Popen:
    """torchrun of tests.crash_driver (train --resume, each step slowed by ``delay`` seconds)."""
    path = tmp_path / "driven.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "tests.crash_driver", str(path), "0", str(delay)]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_fsdp_kill_9_of_one_process_then_resume_gives_the_uninterrupted_adapter(run_config, tmp_path):
    settings = ("train.strategy=fsdp", "train.grad_accum=2", "train.max_steps=10", "train.save_every=2",
                "train.keep_last=5", "train.generate_eval=false")  # fmt: skip
    single = train(run_config(*settings, out="single"), progress=False)
    cfg = run_config(*settings, out="killed").to_dict()
    checkpoints = Path(cfg["output_dir"]) / "checkpoints"
    run = _driven(cfg, tmp_path, delay=0.5)
    deadline = time.monotonic() + 300
    while not (checkpoints / "step-0000004").is_dir():
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()[-4000:] if run.stderr else ""
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)  # rank 1 dies mid-run; torchrun stops rank 0
    assert run.wait(timeout=120) != 0
    assert not (Path(cfg["output_dir"]) / "adapter_model.safetensors").exists()
    # the sharded checkpoints are complete directories: one safetensors file per rank, the JSON state, the adapter
    newest = sorted(p for p in checkpoints.iterdir() if p.name.startswith("step-"))[-1]
    assert sorted(p.name for p in (newest / "sharded").iterdir() if p.suffix == ".safetensors") == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"
    ]  # fmt: skip
    assert not list(newest.rglob("*.pt")) and not list(newest.rglob("*.bin")) and not list(newest.rglob(".metadata"))
    # resumed in one process, the sharded checkpoint is refused (a finished run would be refused as finished)
    with pytest.raises(ValueError, match="written with fsdp and this run uses ddp or one process"):
        train(run_config(*settings, out="killed"), resume=True, progress=False)
    resumed = _driven(cfg, tmp_path, delay=0.0)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-4000:]
    assert "resumed from" in err
    # 10 steps at lr 5e-2 with the whole lm_head trained (modules_to_save) through the chunked fused loss: two
    # ranks' gradient sums round differently, and Adam carries it on (one CI run measured 1.5e-5; 4 steps keep 1e-5)
    assert _max_diff(_adapter(single.output_dir), _adapter(cfg["output_dir"])) <= 5e-5
    # a checkpoint's adapter is an ordinary adapter directory, loadable without torch.distributed
    assert _max_diff(_adapter(newest), _adapter(single.output_dir)) > 0  # (an earlier step's)


@pytest.mark.slow
def test_two_nodes_of_one_process_give_the_adapter_of_one_process(run_config, tmp_path):
    """Multi-node, as the README launches it: two torchrun agents meeting at a rendezvous endpoint."""
    single = train(run_config(*FSDP, out="single"), progress=False)
    cfg = run_config(*FSDP, out="nodes").to_dict()
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        torchrun_train(cfg, tmp_path, launcher=("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                                           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint), wait=False)
        for rank in (0, 1)
    ]  # fmt: skip
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-4000:]
    assert _max_diff(_adapter(single.output_dir), _adapter(cfg["output_dir"])) <= 1e-5


def test_fsdp_in_bf16_mixed_shards_a_bf16_base_with_float32_adapters(run_config, tmp_path):
    """FSDP2 takes a block of bfloat16 frozen weights and float32 adapters as it is; the run follows one process
    in bf16-mixed (to bf16 rounding: the first step's loss, from the same weights) and keeps float32 adapters."""
    settings = (*FSDP, "precision=bf16-mixed", "train.generate_eval=false")
    single = train(run_config(*settings, out="single"), progress=False)
    cfg = run_config(*settings, out="fsdp-mixed").to_dict()
    done = torchrun_train(cfg, tmp_path)
    assert "precision: bf16-mixed" in done.stderr and "fsdp: 2 processes" in done.stderr
    adapter = _adapter(cfg["output_dir"])
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    losses = [[r for r in _records(d) if r["kind"] == "train"] for d in (single.output_dir, cfg["output_dir"])]
    assert losses[1][0]["loss"] == pytest.approx(losses[0][0]["loss"], rel=1e-2)
    evals = [r["loss"] for r in _records(cfg["output_dir"]) if r["kind"] == "eval"]
    assert evals[-1] < evals[0]


def _records(directory) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
@pytest.mark.parametrize(("precision", "computed"), [("bf16-mixed", torch.bfloat16), ("fp32", torch.float32)])
def test_fsdp_on_gpu_follows_the_precision_and_keeps_float32_adapters(monkeypatch, precision, computed):
    """The GPU path: nccl and the mixed-precision policy of the run's precision (bf16-mixed: bf16 compute, fp32
    reduction and parameters; fp32: no policy, float32 throughout)."""
    import torch.distributed as td
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.train.fsdp import shard

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    td.init_process_group("nccl", rank=0, world_size=1)
    try:
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        model = LlamaForCausalLM(config).cuda()
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        seen = []
        model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        shard(model, torch.device("cuda"), _fixed(precision))
        ids = torch.randint(0, 64, (2, 8), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
        assert seen == [computed]
        lora = [p for n, p in model.named_parameters() if "lora_A" in n]
        assert lora and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in lora)
    finally:
        td.destroy_process_group()


def test_skeleton_has_the_real_models_parameters_on_meta_and_its_buffers(tmp_path, tiny_tokenizer):
    from .conftest import save_tiny_lm

    directory = save_tiny_lm(tmp_path, tiny_tokenizer, tie_word_embeddings=True)
    real, _ = lorakit.load_model(directory)
    skeleton, tokenizer = lorakit.load_model(directory, skeleton=True)
    assert tokenizer is not None
    assert [n for n, _ in skeleton.named_parameters()] == [n for n, _ in real.named_parameters()]
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight  # tied as in the real model
    for (name, mine), (_, theirs) in zip(skeleton.named_buffers(), real.named_buffers(), strict=True):
        assert not mine.is_meta and torch.equal(mine, theirs), name


def test_a_tied_head_gives_the_adapter_of_one_process(run_config, tmp_path, tiny_tokenizer):
    """The embedded model's case: the head tied to the embeddings, read once from the files for both."""
    from .conftest import save_tiny_lm

    directory = save_tiny_lm(tmp_path / "tied-lm", tiny_tokenizer, tie_word_embeddings=True)
    settings = [*FSDP, "train.generate_eval=false", f"model={directory}", "lora.modules_to_save=null"]
    single = train(run_config(*settings, out="single"), progress=False)
    cfg = run_config(*settings, out="tied").to_dict()
    torchrun_train(cfg, tmp_path)
    assert _max_diff(_adapter(single.output_dir), _adapter(cfg["output_dir"])) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dora_gives_the_adapter_of_one_process(run_config, tmp_path, tiny_tokenizer, family):
    """DoRA's magnitudes start from whole rows (gathered one layer at a time) and its norms follow every step's
    weights; GPT-2's Conv1D layers keep their weights (d_in, d_out), so a shard's rows are not output rows."""
    from .conftest import save_tiny_lm

    directory = save_tiny_lm(tmp_path / f"{family}-lm", tiny_tokenizer)
    settings = [*FSDP, "train.generate_eval=false", f"model={directory}", "lora.use_dora=true",
                "lora.modules_to_save=null", "lora.target_modules=all-linear"]  # fmt: skip
    single = train(run_config(*settings, out="single"), progress=False)
    cfg = run_config(*settings, out="dora").to_dict()
    torchrun_train(cfg, tmp_path)
    mine, want = _adapter(cfg["output_dir"]), _adapter(single.output_dir)
    magnitudes = [k for k in want if "lora_magnitude_vector" in k]
    assert magnitudes and _max_diff(want, mine) <= 1e-5
