"""Property-based fuzzing of hostile inputs: adapter configs, safetensors headers and dataset rows.

The contract (RELIABILITY.md): each is loaded, refused with a ValueError, or loaded with a warning; never
another exception, never a changed model after a refusal, never an allocation beyond the file's own size.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.data import read_rows, tokenize_pairs, tokenize_rows
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME, read_safetensors
from lorakit.tools.benchmark import peak_rss_bytes

from .conftest import FAMILIES, build_tiny_tokenizer

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Any JSON value, with the extremes that break naive code: huge and negative numbers, NaN and infinities.
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1, 10**12])
    | st.text(max_size=20)
    | st.sampled_from(["q_proj", "all-linear", ".*", "(", "default", "LORA", "pissa", "gaussian", "IA3"])
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_KEYS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
         "use_rslora", "use_dora", "init_lora_weights", "modules_to_save", "bias", "layers_to_transform",
         "layers_pattern", "peft_type", "task_type", "fan_in_fan_out", "base_model_name_or_path", "lora_bias",
         "layer_replication", "revision", "shiny_new_option"]  # fmt: skip


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    model = FAMILIES["llama"].build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init="random"))
    return lorakit.save_adapter(model, tmp_path_factory.mktemp("fuzz") / "adapter")


def _load_outcome(directory: Path) -> str:
    """Load onto a fresh model: 'loaded' or 'refused'; any other exception fails the test. A refusal must
    leave the model exactly as it was."""
    model = FAMILIES["llama"].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            lorakit.load_adapter(model, directory)
        except ValueError as err:
            assert str(err), "a refusal must say why"
            after = model.state_dict()
            assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
            return "refused"
    return "loaded"


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(_KEYS), _JSON, min_size=1, max_size=4),
    drop=st.lists(st.sampled_from(["r", "lora_alpha", "target_modules", "peft_type"]), max_size=2),
)
def test_fuzzed_adapter_config_is_loaded_or_refused(adapter_dir, tmp_path_factory, changes, drop):
    directory = tmp_path_factory.mktemp("cfg")
    good = json.loads((adapter_dir / CONFIG_NAME).read_text())
    config = {k: v for k, v in {**good, **changes}.items() if k not in drop}
    (directory / CONFIG_NAME).write_text(json.dumps(config))  # NaN/Infinity as Python's json writes them
    (directory / WEIGHTS_NAME).write_bytes((adapter_dir / WEIGHTS_NAME).read_bytes())
    _load_outcome(directory)


@FUZZ
@given(value=_JSON)
def test_adapter_config_that_is_not_an_object_is_refused(adapter_dir, tmp_path_factory, value):
    directory = tmp_path_factory.mktemp("cfg")
    (directory / CONFIG_NAME).write_text(json.dumps(value))
    (directory / WEIGHTS_NAME).write_bytes((adapter_dir / WEIGHTS_NAME).read_bytes())
    if not isinstance(value, dict):
        assert _load_outcome(directory) == "refused"
    else:
        _load_outcome(directory)


_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "X9", "", 5, None]
_DIMS = st.integers(min_value=-2, max_value=6) | st.sampled_from([2**31, 2**40, 2**62, 2**64 + 1])
_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(_DTYPES),
        "shape": st.lists(_DIMS, max_size=4) | _JSON,
        "data_offsets": st.lists(st.integers(min_value=-8, max_value=2**40) | st.integers(0, 200), max_size=3) | _JSON,
    }
)


@FUZZ
@given(
    header=st.dictionaries(st.text(min_size=1, max_size=10), _ENTRY, max_size=3),
    metadata=st.none() | _JSON,
    data=st.binary(max_size=256),
    special=st.sampled_from([None, "nan", "inf"]),
    length_field=st.none() | st.integers(min_value=0, max_value=2**64 - 1),
)
def test_fuzzed_safetensors_header_is_read_or_refused(tmp_path_factory, header, metadata, data, special, length_field):
    if special:  # well-formed files whose values are not finite
        values = [float(special)] * 4
        header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
        data = struct.pack("<4f", *values)
        metadata = length_field = None
    body = dict(header)
    if metadata is not None:
        body["__metadata__"] = metadata
    raw = json.dumps(body).encode()
    size = len(raw) if length_field is None else length_field
    path = tmp_path_factory.mktemp("st") / "adapter_model.safetensors"
    path.write_bytes(struct.pack("<Q", size) + raw + data)
    peak = peak_rss_bytes()
    try:
        tensors = read_safetensors(path)
    except ValueError as err:
        assert str(path) in str(err)
        if special:
            assert "NaN or infinite" in str(err)
    else:
        assert not special
        for tensor in tensors.values():
            assert tensor.is_floating_point() and bool(torch.isfinite(tensor).all())
            assert tensor.numel() * tensor.element_size() <= len(data)  # nothing beyond the file's own bytes
    assert peak_rss_bytes() - peak < 64 << 20


def _jsonl_with_junk(path, rows, junk: bytes):
    """One JSON line per row, then ``junk`` bytes (a cut or corrupt end of file)."""
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + junk)
    return path


_ROW_VALUE = _JSON | st.sampled_from(["", "\x00", "\ud7ff" * 3, "a" * 5000])


@FUZZ
@given(
    rows=st.lists(
        st.dictionaries(st.sampled_from(["text", "prompt", "completion", "messages", "other"]), _ROW_VALUE, max_size=3)
        | _JSON,
        min_size=1,
        max_size=4,
    ),
    junk=st.binary(max_size=16),
)
def test_fuzzed_dataset_rows_are_tokenized_or_refused(tmp_path_factory, rows, junk):
    path = _jsonl_with_junk(tmp_path_factory.mktemp("data") / "d.jsonl", rows, junk)
    tokenizer = _TOKENIZER()
    try:
        examples, _ = tokenize_rows(read_rows(path), tokenizer, 32, True)
    except ValueError as err:
        assert str(path) in str(err)
    else:
        assert all(len(e.input_ids) <= 32 for e in examples)


_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "robot"]), "content": _ROW_VALUE}
)


@FUZZ
@given(
    rows=st.lists(
        st.dictionaries(
            st.sampled_from(["prompt", "chosen", "rejected", "messages"]),
            _ROW_VALUE | st.lists(_MESSAGE, max_size=3),
            max_size=4,
        )
        | _JSON,
        min_size=1,
        max_size=4,
    ),
    junk=st.binary(max_size=16),
)
def test_fuzzed_preference_rows_are_paired_or_refused(tmp_path_factory, rows, junk):
    path = _jsonl_with_junk(tmp_path_factory.mktemp("pairs") / "p.jsonl", rows, junk)
    try:
        pairs, _ = tokenize_pairs(read_rows(path), _TOKENIZER(), 32)
    except ValueError as err:
        assert str(path) in str(err)
    else:
        for pair in pairs:
            start = pair.chosen.answer_start
            assert max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) <= 32
            assert pair.chosen.input_ids[:start] == pair.rejected.input_ids[:start]
            assert pair.chosen.input_ids != pair.rejected.input_ids


def _tokenizer_once():
    cache = {}

    def get():
        if "t" not in cache:
            cache["t"] = build_tiny_tokenizer()
        return cache["t"]

    return get


_TOKENIZER = _tokenizer_once()


def test_fuzz_strategies_reach_the_extremes():
    """Guard against a vacuous fuzz: the value strategy does produce NaN, huge integers and nested containers."""
    seen = {"nan": False, "huge": False, "nested": False}

    def walk(value, depth=0):
        if isinstance(value, float) and math.isnan(value):
            seen["nan"] = True
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**40:
            seen["huge"] = True
        children = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
        if depth and children:
            seen["nested"] = True
        for child in children:
            walk(child, depth + 1)

    @settings(max_examples=300, deadline=None)
    @given(_JSON)
    def probe(value):
        walk(value)

    probe()
    assert all(seen.values()), seen
