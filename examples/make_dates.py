"""Generate the bundled task: dates written in words -> ISO 8601 (YYYY-MM-DD), as chat rows.

Deterministic: the same seed gives the same files. SmolLM2-135M-Instruct mostly fails it before tuning
(it answers in sentences or gets day/month numbers wrong); LoRA learns it in a few minutes on a CPU.

    python examples/make_dates.py --out examples/data            # 2000 train + 200 eval rows
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

SYSTEM = "Write the date as YYYY-MM-DD."
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip
_UNITS = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
          "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth", "eighteenth",
          "nineteenth"]  # fmt: skip


def ordinal_words(day: int) -> str:
    if day < 20:
        return _UNITS[day]
    if day % 10 == 0:
        return {20: "twentieth", 30: "thirtieth"}[day]
    return {2: "twenty", 3: "thirty"}[day // 10] + "-" + _UNITS[day % 10]


def ordinal_suffix(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def phrase(date: dt.date, style: int) -> str:
    month = MONTHS[date.month - 1]
    return [
        f"the {ordinal_words(date.day)} of {month}, {date.year}",
        f"{month} {ordinal_suffix(date.day)}, {date.year}",
        f"{date.day} {month} {date.year}",
        f"{month} the {ordinal_words(date.day)}, {date.year}",
    ][style]


def make_rows(n: int, rng: random.Random, seen: set[dt.date]) -> list[dict]:
    rows = []
    start, span = dt.date(1900, 1, 1).toordinal(), (dt.date(2099, 12, 31) - dt.date(1900, 1, 1)).days
    while len(rows) < n:
        date = dt.date.fromordinal(start + rng.randrange(span + 1))
        if date in seen:
            continue
        seen.add(date)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": phrase(date, rng.randrange(4))},
                    {"role": "assistant", "content": date.isoformat()},
                ]
            }
        )
    return rows


def write_split(out: Path, prefix: str, make, train: int, eval_rows: int, seed: int) -> tuple[Path, Path]:
    """Write PREFIX-train.jsonl and PREFIX-eval.jsonl from ``make(n, rng, seen)`` (no date appears in both)."""
    rng = random.Random(seed)
    seen: set[dt.date] = set()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in ((f"{prefix}-train.jsonl", train), (f"{prefix}-eval.jsonl", eval_rows)):
        path = out / name
        path.write_text("".join(json.dumps(r) + "\n" for r in make(n, rng, seen)))
        paths.append(path)
    return paths[0], paths[1]


def write(out: Path, train: int = 2000, eval_rows: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Write dates-train.jsonl and dates-eval.jsonl and return their paths."""
    return write_split(out, "dates", make_rows, train, eval_rows, seed)


def cli(doc: str, write, train: int, eval_rows: int, seed: int, unit: str) -> None:
    """The command line of a task generator: --out, --train, --eval, --seed."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default="examples/data", type=Path)
    parser.add_argument("--train", type=int, default=train)
    parser.add_argument("--eval", type=int, default=eval_rows)
    parser.add_argument("--seed", type=int, default=seed)
    args = parser.parse_args()
    train_path, held = write(args.out, args.train, args.eval, args.seed)
    print(f"wrote {train_path} ({args.train} {unit}) and {held} ({args.eval} {unit})")


if __name__ == "__main__":
    cli(__doc__, write, 2000, 200, 0, "rows")
