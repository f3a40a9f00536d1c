"""Fine-tuning methods behind one interface, so one trainer runs each and `compare` can measure them.

A method turns a loaded model into the module to train (``prepare``), writes its trained state
(``save``), and puts saved state back into a freshly prepared model (``restore``).
"""

from __future__ import annotations

from .base import Method
from .bottleneck import BottleneckAdapters
from .full import FullFineTuning
from .lora import LoraMethod
from .prompt import PromptTuning

METHODS: dict[str, type[Method]] = {
    "full": FullFineTuning,
    "adapter": BottleneckAdapters,
    "prompt": PromptTuning,
    "lora": LoraMethod,
}

__all__ = ["METHODS", "BottleneckAdapters", "FullFineTuning", "LoraMethod", "Method", "PromptTuning"]
