"""A lorakit (PEFT-format) adapter as a directory vLLM serves, checked against vLLM's LoRA constraints.

vLLM's adapter loader (``vllm/lora/peft_helper.py``) refuses DoRA, ``modules_to_save``, trained biases and a
rank above the server's ``--max-lora-rank`` (one of 1, 8, 16, 32, 64, 128, 256, 320, 512), and scales every
layer by one ``lora_alpha / r`` (older versions also refuse rsLoRA). Refused features have no exact fix here:
the error names the constraint and the way out. Per-layer ranks and scalings (``rank_pattern``,
``alpha_pattern``, rsLoRA) do have one: every layer's A and B are padded with zero rows / columns to the
largest rank (a zero-padded rank adds nothing), and each layer's own scaling is folded into its B relative to
the file's one ``lora_alpha / r``, which leaves every update ``s_i B_i A_i`` unchanged; the patterns are then
dropped, so vLLM, PEFT and lorakit read one plain rank-r adapter alike.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from ..io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, atomic_write_many, read_adapter
from .files import check_target, staged_directory

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values


@dataclass
class VllmExport:
    path: Path
    max_rank: int  # the largest rank among the adapter's layers
    max_lora_rank: int  # the smallest --max-lora-rank vLLM accepts that holds it
    base: str | None  # base_model_name_or_path of the adapter
    fixes: list[str] = field(default_factory=list)

    def command(self, name: str) -> str:
        base = self.base or "BASE_MODEL"
        return f"vllm serve {base} --enable-lora --max-lora-rank {self.max_lora_rank} --lora-modules {name}={self.path}"

    def describe(self) -> str:
        fixed = "; ".join(self.fixes) if self.fixes else "no change needed"
        return f"wrote {self.path} for vLLM (largest rank {self.max_rank}): {fixed}"


@dataclass
class VllmFiles:
    """A vLLM adapter directory's contents, ready to be written: the adapter read, refused or fixed."""

    config: dict  # adapter_config.json
    tensors: dict[str, torch.Tensor]
    max_rank: int
    fixes: list[str] = field(default_factory=list)

    def write(self, directory: Path) -> None:
        """Both files into ``directory`` (an existing one: the staged directory of ``staged_directory``)."""
        atomic_write_many(
            {
                directory / CONFIG_NAME: (json.dumps(self.config, indent=2, sort_keys=True) + "\n").encode(),
                directory / WEIGHTS_NAME: safetensors_bytes({k: t.contiguous() for k, t in self.tensors.items()}),
            }
        )

    def result(self, path: Path) -> VllmExport:
        """What was written, once the directory is at ``path``."""
        limit = next(r for r in MAX_LORA_RANKS if r >= self.max_rank)
        return VllmExport(path, self.max_rank, limit, self.config.get("base_model_name_or_path"), self.fixes)


def export_vllm(adapter_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> VllmExport:
    """Write the adapter in ``adapter_dir`` as a vLLM-ready adapter directory ``out``: built beside it and
    swapped in, so that a failure leaves ``out`` as it was.

    Raises:
        ValueError: what ``vllm_files`` refuses, or an existing ``out`` without ``overwrite``.
    """
    out = Path(out)
    check_target(out, overwrite, directory=True)
    files = vllm_files(adapter_dir)
    with staged_directory(out, overwrite) as tmp:
        files.write(tmp)
    return files.result(out)


def vllm_files(adapter_dir: str | os.PathLike) -> VllmFiles:
    """The adapter in ``adapter_dir`` as vLLM will read it, nothing written yet: every refusal comes first.

    Raises:
        ValueError: a feature vLLM refuses (DoRA, modules_to_save, biases, embedding or non-LoRA tensors, a
            rank above 512).
    """
    source = Path(adapter_dir)
    config, tensors = read_adapter(source)
    raw = json.loads((source / CONFIG_NAME).read_text())
    _refuse(config, tensors, source)
    ranks = {key: t.shape[0] for key, t in tensors.items() if key.endswith(".lora_A.weight")}
    max_rank = max(ranks.values())
    if max_rank > MAX_LORA_RANKS[-1]:
        raise ValueError(
            f"{source}: rank {max_rank} exceeds vLLM's largest --max-lora-rank {MAX_LORA_RANKS[-1]}; retrain with "
            "a lower r, or merge the adapter into the base and serve the merged model"
        )
    fixes: list[str] = []
    if config.rank_pattern or config.alpha_pattern or config.use_rslora or len(set(ranks.values())) > 1:
        tensors = _uniform(config, tensors, max_rank)
        raw.update(r=max_rank, lora_alpha=config.alpha, rank_pattern={}, alpha_pattern={}, use_rslora=False)
        fixes.append(
            f"padded every layer to rank {max_rank} with zeros and folded each layer's scaling (rank_pattern / "
            "alpha_pattern / rsLoRA) into its lora_B, since vLLM scales every layer by one lora_alpha / r: the "
            "updates are unchanged"
        )
    return VllmFiles(raw, tensors, max_rank, fixes)


def _refuse(config, tensors: dict[str, torch.Tensor], source: Path) -> None:
    problems = []
    if config.use_dora:
        problems.append("DoRA (vLLM does not support it): merge the adapter into the base, or retrain without use_dora")
    if config.modules_to_save:
        problems.append(
            f"modules_to_save {config.modules_to_save} (vLLM serves LoRA A/B only): merge the adapter into the "
            "base, or retrain without modules_to_save"
        )
    if config.bias != "none":
        problems.append(f"bias={config.bias!r} (vLLM does not load adapter biases): merge, or retrain with bias='none'")
    other = [k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if other and not problems:
        problems.append(f"tensors vLLM does not load ({', '.join(other[:3])}): merge, or retrain on linear layers only")
    if problems:
        raise ValueError(f"{source} cannot be served by vLLM: " + "; ".join(problems))


def _uniform(config, tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Every layer at ``rank`` (zero-padded) with B_i * s_i / (alpha / rank): one scaling gives each its update."""
    uniform = config.alpha / rank
    out = {}
    for key, t in tensors.items():
        pad = rank - (t.shape[0] if key.endswith(".lora_A.weight") else t.shape[1])
        if key.endswith(".lora_A.weight"):
            out[key] = torch.nn.functional.pad(t, (0, 0, 0, pad)).contiguous()
            continue
        path = key.removeprefix(PREFIX).removesuffix(".lora_B.weight")
        r, alpha = config.rank_and_alpha(path)
        b = t.float() * (config.scaling(r, alpha) / uniform)
        out[key] = torch.nn.functional.pad(b, (0, pad)).to(t.dtype).contiguous()
    return out
