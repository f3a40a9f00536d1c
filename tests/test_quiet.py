"""What a command prints besides its output: lorakit's warnings as one plain line, library noise not at all."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings

import pytest

import lorakit
from lorakit.cli import quiet

from .conftest import FAMILIES

# A command whose run() raises, through the real code of each library, the noise of `lorakit train` / `export`.
NOISY_COMMAND = """
import logging, sys
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging
from lorakit.cli import inspect as command
from lorakit.cli.main import main
from lorakit.io import config_from_peft_dict

class Bare(nn.Module):
    is_activation_checkpointing = False

def own_warning():
    config_from_peft_dict({"r": 2, "target_modules": ["q"], "made_up_key": 1}, "adapter_config.json")

def noisy(args):
    own_warning()
    own_warning()  # the same message from another line
    PreTrainedModel.is_gradient_checkpointing.fget(Bare())  # transformers' FutureWarning (PEFT reads it)
    hf_logging.get_logger("transformers.modeling_utils").warning("Some weights were not used")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(  # what importing bitsandbytes logs
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
        "`pip install kernels` and the kernels >= 0.11.1",
        "Kernel repository could not verify publisher trust status. Set trust_remote_code=True",
    )
    nn.init.kaiming_uniform_(torch.empty(0, 3))  # a torch UserWarning
    logging.getLogger("peft.tuners").warning("no layer matched\\n  the target modules")
    return 0

command.run = noisy
sys.exit(main(["inspect", "unused"]))
"""
OWN_LINE = "lorakit: warning: adapter_config.json: ignoring config keys lorakit does not know: made_up_key"


def run_cli(*args: str, verbose: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != quiet.VERBOSE_ENV}
    if verbose:
        env[quiet.VERBOSE_ENV] = "1"
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def test_lorakit_warning_in_a_command_is_one_plain_line(tmp_path):
    model = FAMILIES["llama"].build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=FAMILIES["llama"].targets))
    lorakit.save_adapter(model, tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "made_up_key": 1}))
    err = run_cli("-m", "lorakit", "inspect", str(tmp_path / "adapter"), "--png", str(tmp_path / "map.png")).stderr
    warned = [line for line in err.splitlines() if "made_up_key" in line]
    assert warned == [f"lorakit: warning: {config}: ignoring config keys lorakit does not know: made_up_key"]
    assert ".py:" not in err and "UserWarning" not in err


def test_library_noise_stays_quiet_and_what_matters_is_one_line():
    err = run_cli("-c", NOISY_COMMAND).stderr
    assert err.splitlines() == [
        OWN_LINE,
        "lorakit: warning (torch): Initializing zero-element tensors is a no-op",
        "lorakit: warning (peft): no layer matched the target modules",
    ]


def test_lorakit_verbose_shows_everything_as_python_does():
    err = run_cli("-c", NOISY_COMMAND, verbose=True).stderr
    for shown in ("FutureWarning: `is_gradient_checkpointing` is deprecated", "Some weights were not used"):
        assert shown in err
    assert "Failed to load CPU gemm_4bit_forward from kernels-community" in err
    assert "UserWarning: adapter_config.json: ignoring config keys" in err and ".py:" in err
    assert "lorakit: warning" not in err


@pytest.mark.parametrize(
    ("origin", "category", "message", "line"),
    [
        ("lorakit.targeting", UserWarning, "rank\n  exceeds", "lorakit: warning: rank exceeds"),
        ("lorakit.io", FutureWarning, "key x is renamed", "lorakit: warning: key x is renamed"),
        ("transformers.modeling_utils", FutureWarning, "`a` is deprecated", None),
        ("torch.utils.checkpoint", DeprecationWarning, "use_reentrant", None),
        ("torch.storage", UserWarning, "TypedStorage is deprecated", None),
        ("torch.nn.init", UserWarning, "no-op", "lorakit: warning (torch): no-op"),
        ("", RuntimeWarning, "overflow", "lorakit: warning (python): overflow"),
    ],
)
def test_warning_line_decides_by_origin_and_category(origin, category, message, line):
    assert quiet.warning_line(origin, message, issubclass(category, quiet._DEPRECATIONS)) == line


def test_a_command_leaves_the_programs_settings_as_they_were(monkeypatch):
    for name in (quiet.VERBOSE_ENV, "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)

    def settings() -> tuple:
        loggers = ("transformers", "huggingface_hub", "bitsandbytes.backends.cpu.ops")
        levels = tuple(logging.getLogger(name).level for name in loggers)
        filters = tuple(logging.getLogger(loggers[2]).filters)
        return warnings.showwarning, logging.lastResort, levels, filters, _bars_enabled()

    before = settings()
    during = quiet.call(settings)
    assert during != before and settings() == before
    assert during[2][:2] == (logging.ERROR, logging.ERROR)
    assert during[4] is (before[4] and sys.stderr.isatty())


def _bars_enabled() -> bool:
    from transformers.utils import logging as hf_logging

    return hf_logging.is_progress_bar_enabled()
