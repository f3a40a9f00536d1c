"""Tiny randomly initialised models of the four families, built from transformers config objects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 64


@dataclass
class Family:
    name: str
    build_model: Callable[[], nn.Module]
    targets: list[str]
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
        torch.manual_seed(seed)
        return self.build_model().to(dtype).eval()

    def inputs(self, batch: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
        if self.name == "t5":
            return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
        return {"input_ids": ids}

    def logits(self, model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        with torch.no_grad():
            return model(**(inputs or self.inputs())).logits


FAMILIES = {
    "gpt2": Family(
        "gpt2",
        lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32)),
        targets=["c_attn", "c_proj"],
        rank_pattern={"h.1.attn.c_attn": 2},
        alpha_pattern={"c_proj": 3.0},
    ),
    "bert": Family(
        "bert",
        lambda: BertForSequenceClassification(
            BertConfig(
                vocab_size=VOCAB,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=32,
                num_labels=3,
            )
        ),
        targets=["query", "value"],
        modules_to_save=["classifier"],
        rank_pattern={"layer.0.attention.self.query": 6},
        alpha_pattern={"value": 5.0},
    ),
    "llama": Family(
        "llama",
        lambda: LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=32,
            )
        ),
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"layers.1.mlp.down_proj": 2},
        alpha_pattern={r"layers\.0\.self_attn\.q_proj": 12.0},
    ),
    "t5": Family(
        "t5",
        lambda: T5ForConditionalGeneration(
            T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
        ),
        targets=["q", "v", "wo"],
        rank_pattern={"wo": 3},
        alpha_pattern={"q": 7.0},
    ),
}


@pytest.fixture(params=["blas", "onednn"])
def cpu_gemm(request, monkeypatch):
    """Runs the test with each CPU kernel choice of ``lorakit.fastpath.linear`` (LORAKIT_CPU_GEMM)."""
    from lorakit import fastpath

    if request.param == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setenv("LORAKIT_CPU_GEMM", request.param)
    fastpath.onednn_enabled.cache_clear()
    yield request.param
    fastpath.onednn_enabled.cache_clear()


@pytest.fixture(params=["generic-cpu", "avx512bf16-cpu"])
def bnb_cpu(request, monkeypatch):
    """Runs the test as if on each kind of CPU bitsandbytes tells apart: one with AVX-512 BF16 (Intel Xeon with
    AMX), where ``Linear4bit`` repacks its weight for a bfloat16 kernel on an eval forward, and any other."""
    modules = pytest.importorskip("bitsandbytes.nn.modules")
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: request.param == "avx512bf16-cpu")
    return request.param


def pack_for_cpu(model: nn.Module) -> int:
    """Rewrite every 4-bit layer whose shape allows it in bitsandbytes' packed CPU layout, as bitsandbytes does
    on an AVX-512 BF16 CPU at the first eval forward (here on any CPU). Returns how many layers changed."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    count = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if type(module).__name__ != "Linear4bit" or state is None:
            continue
        n, k = state.shape
        if n % 32 or k % state.blocksize or getattr(state, "packing_format_for_cpu", False):
            continue
        module.weight.data, module.quant_state = _convert_weight_packed_for_cpu(module.weight.data, state)
        module.weight.quant_state = module.quant_state
        count += 1
    return count


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


def randomize_adapters(model: nn.Module, seed: int = 123, scale: float = 0.2) -> None:
    """Give every LoRA tensor random values so the adapter visibly changes the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained in a blink, with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"the colour of item {i} is {c}" for i in range(50) for c in ("red", "blue", "green")]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny LLaMA + tokenizer directory, loadable by lorakit.load_model like any HF model."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-lm"), tiny_tokenizer)


@pytest.fixture(scope="session")
def steerable_lm_dir(tmp_path_factory, tiny_tokenizer):
    """Like tiny_lm_dir with larger random weights (std 0.2, not 0.02): the frozen network then has
    outputs that methods which keep it frozen (adapters, prompts, LoRA) can steer within a few steps."""
    return save_tiny_lm(tmp_path_factory.mktemp("steerable-lm"), tiny_tokenizer, initializer_range=0.2)


def tiny_opt(**extra) -> nn.Module:
    """A tiny random OPT: its decoder runs the MLP on the rows flattened with their tokens (batch * tokens)."""
    from transformers import OPTConfig, OPTForCausalLM

    settings = dict(
        vocab_size=VOCAB, hidden_size=16, ffn_dim=32, word_embed_proj_dim=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, dropout=0.0,
    )  # fmt: skip
    settings.update(extra)
    return OPTForCausalLM(OPTConfig(**settings))


def save_tiny_lm(directory, tiny_tokenizer, family: str = "llama", **extra):
    """Save a tiny random causal LM of ``family`` (``llama``, ``opt`` or ``gpt2``) with the tiny tokenizer."""
    torch.manual_seed(0)
    settings = dict(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if family == "opt":  # its decoder runs the MLP on the rows flattened with their tokens
        opt = {"ffn_dim": 64, "word_embed_proj_dim": 32, "bos_token_id": tiny_tokenizer.bos_token_id, "dropout": 0.1}
        model = tiny_opt(**{**settings, **opt, **extra})
    elif family == "gpt2":  # Conv1D layers: weights stored (d_in, d_out)
        gpt2 = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128, "bos_token_id": settings["eos_token_id"]}
        keep = ("vocab_size", "eos_token_id", "pad_token_id", "tie_word_embeddings")
        model = GPT2LMHeadModel(GPT2Config(**{k: settings[k] for k in keep}, **gpt2, **extra))
    else:
        model = LlamaForCausalLM(
            LlamaConfig(**{**settings, "intermediate_size": 64, "num_key_value_heads": 2, **extra})
        )
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def colour_rows(n: int, seed: int = 0):
    """A learnable toy task as chat rows: the colour of item i is fixed by i."""
    import random

    rng = random.Random(seed)
    colours = ("red", "blue", "green")
    rows = []
    for _ in range(n):
        i = rng.randrange(12)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"colour of item {i}?"},
                    {"role": "assistant", "content": colours[i % 3]},
                ]
            }
        )
    return rows


@pytest.fixture
def run_config(tiny_lm_dir, tmp_path):
    """make(*overrides, out=...): a training config on tiny_lm_dir with a learnable toy task."""
    write_jsonl(tmp_path / "train.jsonl", colour_rows(64))
    write_jsonl(tmp_path / "eval.jsonl", colour_rows(12, seed=1))

    def make(*overrides, out="run"):
        base = [
            f"model={tiny_lm_dir}",
            f"output_dir={tmp_path / out}",
            f"data.train={tmp_path / 'train.jsonl'}",
            f"data.eval={tmp_path / 'eval.jsonl'}",
            "data.max_length=32",
            "lora.r=4",
            "lora.alpha=8",
            "lora.modules_to_save=[lm_head]",
            "train.max_steps=12",
            "train.batch_size=8",
            "train.lr=5e-2",
            "train.warmup_steps=2",
            "train.max_new_tokens=4",
            "precision=fp32",  # exact comparisons (1e-5) between runs; mixed precision is tested on its own
        ]
        from lorakit.train.config import load_config

        return load_config(None, base + list(overrides))

    return make


def train_lm_steps(model, params, ids, steps: int, lr: float) -> list[float]:
    """Plain AdamW steps on the language-model loss of ``ids``; the loss of each step."""
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def logits_alone(model: nn.Module, ids: torch.Tensor, row: int, name: str | None) -> torch.Tensor:
    """The logits of row ``row`` of ``ids`` run alone with adapter ``name`` active (None: the base model), to
    compare with that row of a routed mixed batch."""
    import lorakit

    if name is None:
        with lorakit.disabled(model):
            return model(ids[row : row + 1]).logits
    lorakit.set_active(model, name)
    return model(ids[row : row + 1]).logits


def interrupt_at(monkeypatch, step: int):
    """The next training runs stop with KeyboardInterrupt (as Ctrl-C) after step ``step``'s checkpoint and
    evaluation; returns a function that undoes it."""
    from lorakit.train import loop

    original = loop.Loop._periodic

    def periodic(self, eval_rows):
        original(self, eval_rows)
        if self.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.Loop, "_periodic", periodic)
    return lambda: monkeypatch.setattr(loop.Loop, "_periodic", original)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_train(cfg: dict, tmp_path, *extra, nproc: int = 2, launcher: tuple = (), wait: bool = True):
    """`torchrun -m lorakit train` on a config written from ``cfg``; the finished process, or the running one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    path = tmp_path / f"{Path(cfg['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launch = launcher or ("--nproc_per_node", str(nproc), "--master_port", str(free_port()))
    command = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "lorakit", "train", str(path),
               "--no-progress", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-12000:]
    return done


def decode_in_one_batch(engine, prompts: list[list[int]], adapters: list, tokens: int, timeout: float = 60) -> list:
    """Every prompt on every adapter (None: the base) as requests of exactly ``tokens`` greedy tokens, all waiting
    before ``engine`` starts (one mixed batch), decoded to the end; the engine is stopped after. Returns the
    requests (``request.generated``: the tokens)."""
    import queue

    from lorakit.serve.engine import Request, SamplingParams

    done: queue.Queue = queue.Queue()
    requests = [Request(ids, adapter, SamplingParams(max_tokens=tokens, ignore_eos=True), done.put)
                for ids in prompts for adapter in adapters]  # fmt: skip
    for request in requests:
        engine.submit(request)
    engine.start()
    try:
        for _ in requests:
            while (event := done.get(timeout=timeout)).finish_reason is None:
                assert event.error is None, event.error
    finally:
        engine.stop()
    return requests
