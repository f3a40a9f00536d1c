"""Full fine-tuning: every weight trains; the artifact is a whole model directory."""

from __future__ import annotations

from pathlib import Path

from torch import nn


class FullFineTuning:
    name = "full"

    def prepare(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(True)
        return model

    def save(self, trained: nn.Module, directory: Path, values: dict | None = None) -> Path:
        # safetensors, loadable by plain transformers; gathered values (FSDP) replace the sharded state
        trained.save_pretrained(directory, state_dict=values)
        return directory

    def restore(self, prepared: nn.Module, directory: Path) -> nn.Module:
        from safetensors.torch import load_file

        state = {}
        for file in sorted(directory.glob("*.safetensors")):
            state.update(load_file(str(file)))
        missing, unexpected = prepared.load_state_dict(state, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")}  # tied to the embedding, saved once
        if set(missing) - tied or unexpected:
            raise ValueError(
                f"{directory} does not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        return prepared
