"""Precision: ``decide`` against forced CPU flags and CUDA answers on any machine; training runs in each
precision (bf16-mixed, bf16, fp16-mixed's loss scaler run on this CPU, auto deciding inside the trainer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorakit import precision
from lorakit.precision import PRECISIONS, _fixed, decide
from lorakit.train import loop as loop_module
from lorakit.train import run_precision
from lorakit.train import trainer as trainer_module
from lorakit.train.checkpoint import restore_rng, rng_tensors
from lorakit.train.trainer import train

from .conftest import interrupt_at, save_tiny_lm

AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AVX2 = frozenset({"avx2", "fma"})
EMULATED = "auto: CPU has no AMX or AVX-512 BF16: bf16 would be emulated, slower than float32"


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def _dtypes(model: torch.nn.Module, trainable: bool) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad == trainable}


# ----- the decision -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "name", "reason"),
    [
        (AMX, "bf16-mixed", "auto: CPU has AMX and AVX512 bf16 instructions"),
        (AVX512_BF16, "bf16-mixed", "auto: CPU has AVX512 bf16 instructions"),
        (frozenset({"amx_bf16"}), "bf16-mixed", "auto: CPU has AMX bf16 instructions"),
        (AVX2, "fp32", EMULATED),
        (frozenset(), "fp32", EMULATED),
    ],
)
def test_auto_on_a_cpu_follows_its_bf16_instructions(flags, name, reason):
    chosen = decide("auto", "cpu", flags=flags)
    assert (chosen.name, chosen.reason) == (name, reason)
    assert chosen.describe() == f"precision: {name} ({reason})"


@pytest.mark.parametrize(
    ("supported", "name", "reason"),
    [(True, "bf16-mixed", "auto: the GPU supports bf16"), (False, "fp32", "auto: the GPU has no bf16 support")],
)
def test_auto_on_a_gpu_follows_its_bf16_support(supported, name, reason):
    chosen = decide("auto", "cuda", cuda_bf16=supported, flags=AVX2)  # the CPU's flags do not matter there
    assert (chosen.name, chosen.reason) == (name, reason)


@pytest.mark.parametrize(
    ("name", "storage", "trained", "autocast", "scaled"),
    [
        ("fp32", torch.float32, torch.float32, None, False),
        ("bf16-mixed", torch.bfloat16, torch.float32, torch.bfloat16, False),
        ("bf16", torch.bfloat16, torch.bfloat16, None, False),
    ],
)
def test_a_named_precision_is_taken_as_named_whatever_the_cpu(name, storage, trained, autocast, scaled):
    for flags in (AMX, AVX2):
        chosen = decide(name, "cpu", flags=flags)
        assert (chosen.name, chosen.storage, chosen.trained, chosen.autocast, chosen.scaled) == (
            name, storage, trained, autocast, scaled,
        )  # fmt: skip
        assert chosen.describe() == f"precision: {name}"


def test_fp16_mixed_is_refused_on_a_cpu_and_taken_on_a_gpu():
    with pytest.raises(ValueError, match="precision=fp16-mixed needs a CUDA device.*use precision=bf16-mixed"):
        decide("fp16-mixed", "cpu", flags=AMX)
    chosen = decide("fp16-mixed", "cuda", cuda_bf16=False)
    assert (chosen.storage, chosen.trained, chosen.autocast, chosen.scaled) == (
        torch.float16, torch.float32, torch.float16, True,
    )  # fmt: skip


def test_bf16_on_a_gpu_without_it_is_refused_and_unknown_names_name_the_choices():
    for name in ("bf16-mixed", "bf16"):
        with pytest.raises(ValueError, match=f"precision={name}: the GPU has no bf16 support; use precision=fp16"):
            decide(name, "cuda", cuda_bf16=False)
    with pytest.raises(ValueError, match="precision='float32': use one of " + ", ".join(PRECISIONS)):
        decide("float32", "cpu")


def test_the_context_autocasts_only_the_mixed_precisions():
    with decide("fp32", "cpu").context("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with decide("bf16-mixed", "cpu").context(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        product = torch.ones(2, 3) @ torch.ones(3, 2)
    assert product.dtype == torch.bfloat16 and not torch.is_autocast_enabled("cpu")


# ----- training -----------------------------------------------------------------------------------------
@pytest.fixture
def optimizers(monkeypatch) -> list:
    """The optimizers the next training runs build, as they build them."""
    built = []
    real = trainer_module.build_optimizer

    def build(model, cfg):
        built.append(real(model, cfg))
        return built[-1]

    monkeypatch.setattr(trainer_module, "build_optimizer", build)
    return built


def test_bf16_mixed_trains_float32_adapters_over_a_bf16_base(run_config, optimizers, capsys):
    result = train(run_config("precision=bf16-mixed"), progress=False)
    out, model = result.output_dir, result.model
    assert _dtypes(model, trainable=False) == {torch.bfloat16}  # the frozen base
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trained) and any("modules_to_save" in n for n in trained)
    assert set(trained.values()) == {torch.float32}  # adapters and the lm_head copy (modules_to_save)
    optimizer, _ = optimizers[0]
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}
    losses = [r["loss"] for r in _records(out) if r["kind"] == "train"]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.6 * sum(losses[:3])
    assert result.eval.loss < result.eval_before.loss and result.precision.name == "bf16-mixed"
    # recorded: the run's status, its first metrics record, its printed first line; config.yaml as configured
    assert (_status(out)["precision"], _status(out)["precision_reason"]) == ("bf16-mixed", "set in the config")
    assert _records(out)[0] == {"kind": "run", "step": 0, "precision": "bf16-mixed", "reason": "set in the config"}
    assert capsys.readouterr().err.startswith("precision: bf16-mixed\n")
    assert yaml.safe_load((out / "config.yaml").read_text())["precision"] == "bf16-mixed"
    assert (out / "loss.png").is_file()  # the plot reads past the run record
    from lorakit.ui.runs import Workspace

    assert Workspace(out.parent).summary(out.name)["precision"] == "bf16-mixed"


def test_bf16_mixed_trains_biases_in_float32(run_config, tiny_tokenizer, tmp_path):
    """GPT-2 with every bias trained (lora.bias=all): the biases of its bf16 Conv1D layers and LayerNorms train in
    float32; a LayerNorm's weight goes along (one dtype for both), the matrices stay bf16."""
    directory = save_tiny_lm(tmp_path / "gpt2", tiny_tokenizer, family="gpt2")
    settings = ["precision=bf16-mixed", f"model={directory}", "lora.bias=all", "lora.target_modules=[c_attn]",
                "lora.modules_to_save=null", "train.max_steps=3", "train.eval_before=false",
                "train.generate_eval=false"]  # fmt: skip
    model = train(run_config(*settings), progress=False).model
    biases = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases and set(biases.values()) == {torch.float32}
    matrices = {p.dtype for p in model.parameters() if not p.requires_grad and p.dim() == 2}
    norms = {m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert matrices == {torch.bfloat16} and norms == {torch.float32}


def test_bf16_trains_everything_in_bf16(run_config, optimizers):
    result = train(run_config("precision=bf16", "train.max_steps=6", "train.generate_eval=false"), progress=False)
    assert _dtypes(result.model, trainable=False) == _dtypes(result.model, trainable=True) == {torch.bfloat16}
    optimizer, _ = optimizers[0]
    assert {v.dtype for s in optimizer.state.values() for k, v in s.items() if k != "step"} == {torch.bfloat16}
    saved = load_file(result.output_dir / "adapter_model.safetensors")  # widened to float32, exactly
    assert {t.dtype for t in saved.values()} == {torch.float32}
    a = next(p for n, p in result.model.named_parameters() if n.endswith("q_proj.lora_A.default.weight"))
    assert torch.equal(saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], a.float())
    assert result.eval.loss < result.eval_before.loss and _status(result.output_dir)["precision"] == "bf16"


@pytest.mark.parametrize("method", ["full", "adapter", "prompt"])
def test_every_method_trains_in_float32_under_bf16_mixed(run_config, method):
    """What trains is float32 whatever created it (a full fine-tune's weights, bottleneck layers, a soft prompt)."""
    from lorakit.models import load_model
    from lorakit.tools.compare import build_method

    cfg = run_config("precision=bf16-mixed", "train.max_steps=4", "train.generate_eval=false",
                     "compare.adapter_size=8", "compare.prompt_length=4", "train.lr=1e-2")  # fmt: skip
    _, tokenizer = load_model(cfg.model)
    result = train(cfg, progress=False, method=build_method(cfg, method, tokenizer))
    assert _dtypes(result.model, trainable=True) == {torch.float32}
    assert _dtypes(result.model, trainable=False) == (set() if method == "full" else {torch.bfloat16})
    assert result.eval.loss < result.eval_before.loss


@pytest.mark.parametrize(("flags", "name", "reason"), [(AVX2, "fp32", EMULATED), (AMX, "bf16-mixed", "AMX")])
def test_auto_decides_inside_the_trainer_by_the_cpu(run_config, monkeypatch, flags, name, reason):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    settings = ("precision=auto", "train.max_steps=1", "train.eval_before=false", "train.generate_eval=false")
    result = train(run_config(*settings), progress=False)
    out = result.output_dir
    assert result.precision.name == name and _status(out)["precision"] == name
    assert reason in _status(out)["precision_reason"] and reason in _records(out)[0]["reason"]
    assert _dtypes(result.model, trainable=False) == {torch.bfloat16 if name == "bf16-mixed" else torch.float32}
    assert yaml.safe_load((out / "config.yaml").read_text())["precision"] == "auto"  # decided again on a rerun


def test_a_precision_the_device_lacks_is_refused_before_anything_is_written(run_config):
    cfg = run_config("precision=fp16-mixed")
    with pytest.raises(ValueError, match=r"precision=fp16-mixed needs a CUDA device.* \(on cpu\)"):
        train(cfg, progress=False)
    assert not Path(cfg.output_dir).exists()


# ----- fp16-mixed: the loss scaler, run on this CPU (autocast float16 and a CPU GradScaler) ---------------------
@pytest.fixture
def fp16_mixed_on_cpu(monkeypatch):
    """Runs train in fp16-mixed on this CPU (decide refuses it there: float16 is slow on a CPU, not wrong), and
    makes step 3's gradients infinite (as an overflow of the scaled loss does)."""
    monkeypatch.setattr(run_precision, "decide", lambda name, device: _fixed("fp16-mixed", "forced for the test"))
    real = loop_module.Loop._step

    def step(self, indices):
        if self.step + 1 != 3:
            return real(self, indices)
        param = next(p for n, p in self.model.named_parameters() if "lora_B" in n)
        hook = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        try:
            return real(self, indices)
        finally:
            hook.remove()

    monkeypatch.setattr(loop_module.Loop, "_step", step)


def test_fp16_mixed_scales_the_loss_and_skips_overflowing_steps(run_config, fp16_mixed_on_cpu, capsys):
    result = train(run_config("train.max_steps=6", "train.generate_eval=false"), progress=False)
    out, model = result.output_dir, result.model
    assert _dtypes(model, trainable=False) == {torch.float16} and _dtypes(model, trainable=True) == {torch.float32}
    steps = [r for r in _records(out) if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # the run went on (train.nan_policy=stop)
    skipped = [r["step"] for r in steps if r["grad_norm"] is None]
    assert 3 in skipped and result.skipped_steps == len(skipped)
    assert steps[2]["loss_scale"] == steps[1]["loss_scale"] / 2  # the scaler backed off
    assert "step 3: the gradient norm is inf at loss scale" in capsys.readouterr().err
    assert _status(out)["state"] == "finished" and _status(out)["precision"] == "fp16-mixed"
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}


def test_fp16_mixed_resume_restores_the_loss_scaler(run_config, fp16_mixed_on_cpu, monkeypatch):
    settings = ("train.max_steps=6", "train.save_every=2", "train.generate_eval=false", "train.eval_before=false")
    straight = train(run_config(*settings, out="straight"), progress=False)
    restore = interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(*settings, out="resumed"), progress=False)
    restore()
    resumed_states = []
    real = trainer_module.setup_resume

    def setup_resume(loop, **kwargs):
        start = real(loop, **kwargs)
        resumed_states.append(loop.scaler.state_dict())
        return start

    monkeypatch.setattr(trainer_module, "setup_resume", setup_resume)
    resumed = train(run_config(*settings, out="resumed"), resume=True, progress=False)
    saved = json.loads((resumed.output_dir / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert resumed_states == [saved["scaler"]] and saved["scaler"]["scale"] < 65536.0  # not a fresh scaler
    runs = (straight.output_dir, resumed.output_dir)
    scales = [[r["loss_scale"] for r in _records(o) if r["kind"] == "train"] for o in runs]
    assert scales[0] == scales[1]
    want, got = (load_file(o / "adapter_model.safetensors") for o in runs)
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6
    assert resumed.skipped_steps == straight.skipped_steps >= 1
    assert [r["step"] for r in _records(resumed.output_dir) if r["kind"] == "run"] == [0, 4]  # each start's decision


# ----- checkpoints: the random states ------------------------------------------------------------------------
def test_checkpoints_carry_each_gpus_random_state_where_cuda_is_used(monkeypatch):
    """Without a GPU: a stand-in for torch.cuda's random-state functions, two devices."""
    states = {0: torch.tensor([1, 2], dtype=torch.uint8), 1: torch.tensor([3, 4], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda index: states[index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda value, index: states.__setitem__(index, value))
    saved = rng_tensors()
    assert sorted(saved) == ["rng.cuda.0", "rng.cuda.1", "rng.torch"] and sorted(rng_tensors([1])) == [
        "rng.cuda.1", "rng.torch",
    ]  # fmt: skip
    states[0], states[1] = torch.zeros(2, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8)
    restore_rng(saved)
    assert states[0].tolist() == [1, 2] and states[1].tolist() == [3, 4]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # resumed on a machine with fewer GPUs
    restore_rng({**saved, "rng.cuda.1": torch.tensor([9, 9], dtype=torch.uint8)})
    assert states[1].tolist() == [3, 4]


# ----- on a GPU -----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
@pytest.mark.parametrize("name", ["auto", "fp16-mixed"])
def test_on_a_gpu_auto_and_fp16_mixed_train_float32_adapters(run_config, name):
    result = train(run_config(f"precision={name}", "train.max_steps=6", "train.generate_eval=false"), progress=False)
    expected = {"auto": "bf16-mixed" if torch.cuda.is_bf16_supported() else "fp32", "fp16-mixed": "fp16-mixed"}
    assert result.precision.name == expected[name] and _dtypes(result.model, trainable=True) == {torch.float32}
    assert result.eval.loss < result.eval_before.loss
    steps = [r for r in _records(result.output_dir) if r["kind"] == "train"]
    assert ("loss_scale" in steps[-1]) == (name == "fp16-mixed")
