"""docs/architecture.md names every module of the package and every layer of the import contract, so the map
cannot silently fall behind the code."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()
PACKAGE = ROOT / "src" / "lorakit"


def test_every_module_is_on_the_map():
    names = {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    for package in (p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        names.add(f"{package.name}/")
        names |= {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    missing = sorted(n for n in names if not re.search(rf"(?<![\w/]){re.escape(n)}(?!\w)", DOC))
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_every_layer_of_the_contract_is_on_the_map():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["id"] == "layers"]
    for layer in layers:
        for module in layer.split("|"):
            name = module.strip().removeprefix("lorakit.")
            assert re.search(rf"(?<!\w){re.escape(name)}(?!\w)", DOC), name
