"""Generate the bundled preference task: dates in words, written in numbers the preferred way (ISO 8601).

Each row asks for a date in numbers without saying which format; the chosen answer is ISO 8601
(``1999-05-03``), the rejected one the day-first European form (``03/05/1999``) of the same date. Before
tuning, SmolLM2-135M-Instruct finds neither form clearly more likely (it ranks the ISO answer first on about
half of the pairs) and, asked to answer, writes the date in words. Deterministic: the same seed gives the
same files; no date appears in both.

    python examples/make_preferences.py --out examples/data     # 1000 train + 200 eval pairs
"""

from __future__ import annotations

import datetime as dt
import random
import re
from pathlib import Path

from make_dates import cli, phrase, write_split

QUESTION = "Write this date in numbers: {}"
ISO = re.compile(r"\d{4}-\d{2}-\d{2}\b")


def make_rows(n: int, rng: random.Random, seen: set[dt.date]) -> list[dict]:
    rows = []
    start, span = dt.date(1900, 1, 1).toordinal(), (dt.date(2099, 12, 31) - dt.date(1900, 1, 1)).days
    while len(rows) < n:
        date = dt.date.fromordinal(start + rng.randrange(span + 1))
        if date in seen or date.day == date.month:  # day-first and month-first forms must differ
            continue
        seen.add(date)
        rows.append(
            {
                "prompt": [{"role": "user", "content": QUESTION.format(phrase(date, rng.randrange(4)))}],
                "chosen": date.isoformat(),
                "rejected": date.strftime("%d/%m/%Y"),
            }
        )
    return rows


def follows(answer: str) -> bool:
    """The checker of the preferred behaviour: the answer starts with a date written as YYYY-MM-DD."""
    return bool(ISO.match(answer.strip()))


def write(out: Path, train: int = 1000, eval_rows: int = 200, seed: int = 7) -> tuple[Path, Path]:
    """Write prefs-train.jsonl and prefs-eval.jsonl (no date in both) and return their paths."""
    return write_split(out, "prefs", make_rows, train, eval_rows, seed)


if __name__ == "__main__":
    cli(__doc__, write, 1000, 200, 7, "pairs")
