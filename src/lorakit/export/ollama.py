"""An Ollama model directory: the GGUF file(s) and a ``Modelfile`` (``lorakit export --format ollama``).

Ollama's Modelfile (docs/modelfile.md in the Ollama repository): ``FROM`` a GGUF file (relative to the
Modelfile), ``ADAPTER`` a LoRA GGUF applied over it, ``TEMPLATE`` the prompt in Go's template syntax over
``.Messages`` (each with ``.Role`` and ``.Content``), ``SYSTEM`` the default system message, and ``PARAMETER
stop`` one stop string per line. Two layouts: one merged GGUF (``merged``, the default), or, as an explicit
choice (``--ollama-layout adapter``), the untouched base GGUF plus the adapter (``ADAPTER``), which Ollama
0.34.1 and later refuse at ``ollama create`` (ollama PR 14969; a model built with ``ADAPTER`` on an older Ollama
still runs): ``ADAPTER_CAVEAT``, printed with that layout.

The template is the model's chat template family written for Ollama (ChatML, Llama 3); the default system
message is the one the model's own (Jinja) chat template inserts when a chat has none, found by rendering it,
so Ollama builds the same prompt lorakit trained on. Other families get no ``TEMPLATE`` line, and Ollama
falls back to the template it detects from the GGUF's ``tokenizer.chat_template``; the result says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MODELFILE = "Modelfile"
LAYOUTS = ("merged", "adapter")  # --ollama-layout; the first is the default
ADAPTER_CAVEAT = (
    "Ollama 0.34.1 and later reject ADAPTER in a Modelfile at `ollama create` (ollama PR 14969); for those "
    "versions use the default merged layout (--ollama-layout merged)"
)
# family: (marker in the Jinja template, Ollama template, stop strings)
FAMILIES = {
    "chatml": (
        "<|im_start|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"),
    ),
    "llama3": (
        "<|start_header_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
}
_PROBE = "\x01lorakit-probe\x01"


@dataclass
class OllamaExport:
    """What was written."""

    directory: Path
    model_file: str  # FROM
    adapter_file: str | None  # ADAPTER, None when merged
    family: str | None  # the template family written, None when left to Ollama's detection
    stops: list[str] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)  # the GGUF writers' own descriptions

    def describe(self) -> str:
        what = f"FROM {self.model_file}" + (f", ADAPTER {self.adapter_file}" if self.adapter_file else "")
        template = (
            f"TEMPLATE ({self.family}), stop {', '.join(self.stops)}"
            if self.family
            else "no TEMPLATE (an unknown chat template family: Ollama detects one from the GGUF)"
        )
        return "\n".join([*self.parts, f"wrote {self.directory / MODELFILE}: {what}; {template}"])

    @property
    def caveat(self) -> str | None:
        """What to know before ``ollama create``: the adapter layout's version limit (None when merged)."""
        return ADAPTER_CAVEAT if self.adapter_file else None

    def command(self, name: str) -> str:
        return f"ollama create {name} -f {self.directory / MODELFILE} && ollama run {name}"


def modelfile(model_file: str, adapter_file: str | None, tokenizer) -> tuple[str, str | None, list[str]]:
    """The Modelfile text, the template family used (or None) and the stop strings."""
    lines = [f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    template = getattr(tokenizer, "chat_template", None) or ""
    family = next((name for name, (marker, _, _) in FAMILIES.items() if marker in template), None)
    stops: list[str] = []
    if family:
        _, go_template, stops_ = FAMILIES[family]
        stops = list(stops_)
        lines.append(f'TEMPLATE """{go_template}"""')
        system = default_system(tokenizer)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n", family, stops


def default_system(tokenizer) -> str | None:
    """The system message the model's chat template adds to a chat without one (SmolLM2's does), or None."""
    try:
        with_none = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False)
        with_own = tokenizer.apply_chat_template(
            [{"role": "system", "content": _PROBE + "s"}, {"role": "user", "content": _PROBE}], tokenize=False
        )
    except Exception:  # a template that refuses system messages: nothing to carry over
        return None
    prefix_none, prefix_own = with_none.split(_PROBE)[0], with_own.split(_PROBE + "s")[0]
    if not with_none.startswith(prefix_own) or len(prefix_none) <= len(prefix_own):
        return None
    # the template put its own system message where ours would go: its text runs up to the role's end marker
    inserted = with_none[len(prefix_own) :]
    suffix = with_own.split(_PROBE + "s")[1].split(_PROBE)[0]  # from the end of our system text to the user's
    end = inserted.find(suffix)
    return inserted[:end] if end > 0 else None
