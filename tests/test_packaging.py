"""The installed package must contain every subpackage of pithlint/ and rules/, and the lint
path must not import torch or transformers (a pre-commit run must stay fast)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _subpackages(folder: Path, name: str) -> set[str]:
    return {
        ".".join((name, *init.parent.relative_to(folder).parts))
        for init in folder.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    expected = _subpackages(ROOT / "pithlint", "pithlint") | _subpackages(ROOT / "rules", "pithlint.rules")
    assert expected - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_lint_path_imports_neither_torch_nor_transformers(tmp_path):
    target = tmp_path / "m.py"
    target.write_text("x = 1\n", encoding="utf-8")
    code = (
        "import sys\n"
        "from pithlint.cli import main\n"
        "try:\n"
        f"    main([{str(target)!r}, '--select', 'ALL'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors', 'rich') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert "HEAVY=\n" in result.stdout, result.stdout + result.stderr
