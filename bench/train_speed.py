"""Training step, memory and forward cost against PEFT and full fine-tuning: the program behind `lorakit bench`.

    .venv/bin/python bench/train_speed.py [--rounds 2] [--steps 5] [--batch 8] [--seq 128] [--markdown FILE]
    .venv/bin/python bench/train_speed.py --check-loss   # lorakit and PEFT losses over 20 steps agree

The modes, options and defaults are described in lorakit.tools.benchmark (`lorakit bench --help`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from lorakit.tools.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
