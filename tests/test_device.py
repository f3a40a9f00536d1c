"""The run config's ``device`` key (``lorakit.train.distributed.resolve_device`` / ``setup``): every choice against
forced GPU counts and torchrun ranks on any machine, clear errors, and TF32 switched on for CUDA."""

import pytest
import torch

from lorakit.train import distributed as dist
from lorakit.train.config import load_config

CPU, CUDA0, CUDA1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.mark.parametrize(
    ("device", "count", "local", "expected"),
    [
        ("auto", 0, None, CPU),
        ("auto", 2, None, CUDA0),
        ("cpu", 2, None, CPU),
        ("cuda", 1, None, CUDA0),
        ("cuda:1", 2, None, CUDA1),
        ("auto", 2, 1, CUDA1),  # torchrun: each process its LOCAL_RANK's GPU
        ("cuda", 2, 1, CUDA1),
        ("cpu", 2, 1, CPU),
        ("auto", 0, 1, CPU),
    ],
)
def test_the_device_key_resolves_against_the_gpus_present(device, count, local, expected):
    assert dist.resolve_device(device, count, local) == expected


@pytest.mark.parametrize(
    ("device", "count", "local", "words"),
    [
        ("gpu", 1, None, "device='gpu': use auto, cpu, cuda or cuda:N"),
        ("cuda", 0, None, "device=cuda: no CUDA GPU is visible to PyTorch here"),
        ("cuda:0", 0, None, "no CUDA GPU is visible"),
        ("cuda:2", 2, None, "device=cuda:2: only 2 GPU(s) are visible (cuda:0 to cuda:1)"),
        ("cuda:1", 2, 0, "each process takes the GPU of its LOCAL_RANK; use device: cuda"),
        ("cuda", 2, 3, "LOCAL_RANK=3 but only 2 GPU(s) are visible"),
    ],
)
def test_a_device_that_is_not_there_is_refused_with_the_way_out(device, count, local, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        dist.resolve_device(device, count, local)


def test_the_config_refuses_an_unknown_device_and_keeps_a_good_one():
    assert load_config(None, ["device=cuda:1"]).device == "cuda:1"
    assert load_config(None, []).device == "auto"
    with pytest.raises(ValueError, match="device='tpu': use auto, cpu, cuda or cuda:N"):
        load_config(None, ["device=tpu"])


def test_setup_on_the_cpu_and_tf32_on_cuda(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.setup("cpu").device == CPU
    assert dist.setup("auto", cuda_count=0).device == CPU
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)  # no GPU here: only the decision is checked
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert dist.setup("cuda", cuda_count=1).device == CUDA0
        assert chosen == [CUDA0]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_attention_key_reaches_the_model(run_config, attention):
    """`attention` builds the model with that implementation (plain and quantized loading alike); auto leaves
    transformers' choice; fuse_forwards then swaps only sdpa for lorakit's."""
    from lorakit.train import trainer

    cfg = run_config(f"attention={attention}")
    model, _ = trainer.setup_model(cfg, precision=None, log=lambda m: None)
    assert model.config._attn_implementation == attention
    pytest.importorskip("bitsandbytes")
    quantized, _ = trainer.setup_model(run_config(f"attention={attention}", "quantize=nf4"), log=lambda m: None)
    assert quantized.config._attn_implementation == attention


def test_an_attention_the_model_lacks_is_refused_when_it_loads(run_config):
    from lorakit.train import trainer

    with pytest.raises(
        ValueError, match=r"attention=flash_attention_2: .*FlashAttention2.* use attention: sdpa or eager"
    ):
        trainer.setup_model(run_config("attention=flash_attention_2"), log=lambda m: None)
