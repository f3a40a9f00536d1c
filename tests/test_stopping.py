"""One stop-token policy (``lorakit.stopping``): what it selects for tokenizers of several families, and that
evaluation, the export's parity check, ``lorakit generate`` and the server select the same set for one model."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.stopping import gguf_stop_ids, stop_token_ids, template_end_of_turn

from .conftest import CHATML, randomize_adapters

LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "{{ '<bos>' }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3 = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MISTRAL = (
    "{{ '<s>' }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
)
PLAIN = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _tokenizer(specials: list[str], eos: str, template: str | None):
    """A tiny byte-level BPE tokenizer with these special tokens, EOS and chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", *specials], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello there, the answer is blue", "what is the colour of the sky?"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, unk_token="<unk>")
    if template is not None:
        fast.chat_template = template
    return fast


def _id(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


FAMILIES = {
    # name: (special tokens, EOS, template, the tokens the policy stops at)
    "chatml": (
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        "<|endoftext|>",
        CHATML,
        ["<|endoftext|>", "<|im_end|>"],
    ),
    "llama3": (
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
        ],
        "<|end_of_text|>",
        LLAMA3,
        ["<|end_of_text|>", "<|eot_id|>"],  # <|eom_id|> is in the vocabulary, but this template never writes it
    ),
    "llama3.1 tools": (
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
        ],
        "<|end_of_text|>",
        LLAMA3.replace("<|eot_id|>", "{{ '<|eom_id|>' if m.get('tool') else '<|eot_id|>' }}"),
        ["<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"],
    ),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<eos>", GEMMA, ["<eos>", "<end_of_turn>"]),
    "phi3": (
        ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "<|endoftext|>",
        PHI3,
        ["<|endoftext|>", "<|end|>"],
    ),
    "mistral": (["<s>", "</s>"], "</s>", MISTRAL, ["</s>"]),
    "plain template": (["</s>"], "</s>", PLAIN, ["</s>"]),
    "no template": (["</s>", "<|im_end|>"], "</s>", None, ["</s>"]),
    # the template writes <|im_end|>, but this vocabulary has no such token: it is text, nothing to stop at
    "chatml text": (["</s>"], "</s>", CHATML, ["</s>"]),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_policy_on_tokenizers_of_several_families(family):
    specials, eos, template, expected = FAMILIES[family]
    tokenizer = _tokenizer(specials, eos, template)
    assert stop_token_ids(tokenizer) == {_id(tokenizer, t) for t in expected}
    assert all(isinstance(i, int) for i in stop_token_ids(tokenizer))


def test_a_template_that_refuses_the_probe_still_names_its_end_of_turn():
    """A template that raises on a plain user / assistant chat (jinja's raise_exception): the end-of-turn tokens
    its text names are still found."""
    template = "{{ raise_exception('a system message first') if messages[0]['role'] != 'system' }}" + CHATML
    tokenizer = _tokenizer(["<|im_start|>", "<|im_end|>", "</s>"], "</s>", template)
    assert template_end_of_turn(tokenizer) == {_id(tokenizer, "<|im_end|>")}


def test_the_models_declared_ids_and_the_gguf_s_are_added(tmp_path):
    tokenizer = _tokenizer(["<|im_start|>", "<|im_end|>", "</s>", "<x>", "<y>", "<z>"], "</s>", CHATML)
    x, y, z = (_id(tokenizer, t) for t in ("<x>", "<y>", "<z>"))
    ours = {_id(tokenizer, "</s>"), _id(tokenizer, "<|im_end|>")}
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, eos_token_id=x)
    )  # fmt: skip
    model.generation_config = GenerationConfig(eos_token_id=[x, y])  # one id or a list, as Llama 3's
    assert stop_token_ids(tokenizer, model) == ours | {x, y}
    assert stop_token_ids(tokenizer, model.config) == ours | {x}
    assert stop_token_ids(tokenizer, model.generation_config, gguf_ids=[z]) == ours | {x, y, z}
    assert stop_token_ids(None, model) == {x, y}
    metadata = {"tokenizer.ggml.eos_token_id": "2", "tokenizer.ggml.eot_token_id": "7", "general.name": "m"}
    assert gguf_stop_ids(metadata) == {2, 7}  # llama-cpp-python's metadata: strings
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_eos_token_id(3)
    writer.add_uint32("tokenizer.ggml.eot_token_id", 9)
    writer.add_uint32("tokenizer.ggml.eom_token_id", 11)
    writer.add_bos_token_id(1)  # not a stop
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    assert gguf_stop_ids(tmp_path / "m.gguf") == {3, 9, 11}
    (tmp_path / "bad.gguf").write_bytes(b"not a GGUF")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        gguf_stop_ids(tmp_path / "bad.gguf")


@pytest.mark.integration
def test_the_embedded_model_stops_at_its_end_of_turn_which_its_gguf_declares():
    from lorakit.models import default_gguf

    model, tokenizer = lorakit.load_model("default")
    im_end = _id(tokenizer, "<|im_end|>")
    assert template_end_of_turn(tokenizer) == {im_end} and tokenizer.eos_token_id == im_end
    assert gguf_stop_ids(default_gguf()) == {im_end}  # the GGUF adds nothing the converted model lacks
    assert stop_token_ids(tokenizer, model) == stop_token_ids(tokenizer, model, gguf_stop_ids(default_gguf()))


# ----- one set for evaluation, export parity, `lorakit generate` and the server ------------------------------
def _selected(monkeypatch, tmp_path, spec: str) -> dict[str, frozenset[int]]:
    """The stop ids each consumer of the policy uses for the model ``spec``, seen on its own code path:
    evaluation's sample answers (the ids it passes to generate), the export's parity check (the ids its report
    is computed with), ``lorakit generate`` (the ids it passes to generate) and the server's engine (the ids it
    finishes a request at)."""
    from lorakit.cli.main import main
    from lorakit.data import tokenize_row
    from lorakit.export import export_adapter, orchestrate
    from lorakit.serve.engine import Engine
    from lorakit.train.evaluate import evaluate

    seen: dict[str, frozenset[int]] = {}
    model, tokenizer = lorakit.load_model(spec)
    real_generate = type(model).generate

    def generate(self, *args, **kwargs):
        seen[current] = frozenset(kwargs["eos_token_id"])
        kwargs["max_new_tokens"] = 1
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", generate)
    current = "evaluation"
    row = {"messages": [{"role": "user", "content": "the colour?"}, {"role": "assistant", "content": "blue"}]}
    evaluate(model, tokenizer, [tokenize_row(row, "row 1", tokenizer, True)[0]], samples=1, max_new_tokens=2)
    current = "generate"
    assert main(["generate", "--model", spec, "--chat", "the colour?", "--precision", "fp32"]) == 0

    real_parity = orchestrate.model_parity

    def model_parity(*args, stop_ids, **kwargs):
        seen["export parity"] = frozenset(stop_ids)
        return real_parity(*args, stop_ids=stop_ids, **kwargs)

    monkeypatch.setattr(orchestrate, "model_parity", model_parity)
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    export_adapter(tmp_path / "adapter", tmp_path / "vllm", model=spec, fmt="vllm", max_prompts=1,
                   max_new_tokens=2)  # fmt: skip
    served, _ = lorakit.load_model(spec)
    seen["server"] = Engine(served, tokenizer, few_row_fast_path=False).eos_ids
    return seen


def test_evaluation_export_generate_and_the_server_stop_at_the_same_tokens(monkeypatch, tmp_path):
    """A model whose sources disagree: the tokenizer's EOS is </s>, the chat template ends a turn with
    <|im_end|>, and the generation config adds <x>. Every consumer stops at all three."""
    tokenizer = _tokenizer(["<|im_start|>", "<|im_end|>", "</s>", "<pad>", "<x>"], "</s>", CHATML)
    tokenizer.pad_token = "<pad>"
    eos, im_end, x = (_id(tokenizer, t) for t in ("</s>", "<|im_end|>", "<x>"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id)
    )  # fmt: skip
    model.generation_config = GenerationConfig(eos_token_id=[eos, x], pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    seen = _selected(monkeypatch, tmp_path, str(tmp_path / "model"))
    assert set(seen) == {"evaluation", "generate", "export parity", "server"}, seen
    assert set(seen.values()) == {frozenset({eos, im_end, x})}, seen


@pytest.mark.integration
def test_the_embedded_model_stops_alike_everywhere(monkeypatch, tmp_path):
    """The embedded model is a GGUF: the export's check adds the ids the file declares; the set stays the one
    evaluation, generate and the server use."""
    seen = _selected(monkeypatch, tmp_path, "default")
    assert set(seen.values()) == {frozenset({2})}, seen
