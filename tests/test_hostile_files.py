"""Hostile input: every file is linted or reported clearly, never a crash, hang or traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pithlint.config import Settings
from pithlint.engine import LintRun


@pytest.fixture(scope="module")
def run():
    return LintRun.create(Settings(), select=["ALL"], profile="v1")


def codes(findings):
    return [f.code for f in findings]


@pytest.mark.parametrize(
    "source",
    [
        "match x:\n    case [a, *rest]:\n        pass\n    case {'k': v}:\n        pass\n    case _:\n        pass\n",
        "def f[T](x: T) -> T:\n    return x\n\nclass Box[T]:\n    pass\n",
        "type Alias = list[int]\n",
        "x = f\"{'a' + \"b\"}\"\n",
        "try:\n    pass\nexcept* ValueError:\n    pass\n",
        "def f():\n\treturn 1\n",
        "import torch\r\nx = 1\r\n",
        "",
        "\n\n\n",
    ],
    ids=["match", "pep695-generics", "type-statement", "pep701-fstring", "except-star", "tabs", "crlf", "empty", "blank-lines"],
)
def test_modern_and_unusual_syntax_is_linted(run, source):
    assert codes(run.lint_source(source, "m.py")) == []


def test_crlf_findings_keep_their_line_numbers(run):
    source = "def f(w, a, b, c):\r\n    n, r, k = w.shape\r\n    return w.view(n, k, r)\r\n"
    findings = run.lint_source(source, "m.py")
    assert [(f.code, f.line) for f in findings] == [("PTL303", 3)]


@pytest.mark.parametrize("terms", [7_000, 200_000])
def test_deep_expression_is_refused_quickly_without_crashing(run, terms):
    # 7,000 nested additions segfault libcst on an 8 MiB stack and take it ~10 s to parse.
    findings = run.lint_source("x = " + "+".join(["a"] * terms) + "\n", "deep.py")
    assert codes(findings) == ["PTL001"]
    assert "more than 1000 levels deep" in findings[0].message


def test_deep_nesting_below_the_check_threshold_parses_on_the_large_stack(run):
    # Small enough to skip the CPython depth check, deep enough to stress the parser stack.
    source = "x = (\n" + "\n+ ".join(["a"] * 3_000) + "\n)\n"
    assert len(source) < 16_000
    assert codes(run.lint_source(source, "deep.py")) == []


def test_huge_flat_file_is_linted(run):
    body = "\n".join(f"VALUE_{i} = {i}" for i in range(20_000)) + "\n"
    assert codes(run.lint_source(body, "huge.py")) == []


def test_huge_file_end_to_end_exit_code(tmp_path):
    (tmp_path / "big.py").write_text("x = [\n" + "    1,\n" * 50_000 + "]\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "pithlint", "big.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bom_and_latin1_and_invalid_bytes(tmp_path, run):
    (tmp_path / "bom.py").write_bytes(b"\xef\xbb\xbfx = 1\n")
    (tmp_path / "latin.py").write_bytes(b"# coding: latin-1\nname = '\xe9'\n")
    (tmp_path / "bad.py").write_bytes(b"x = '\xff'\n")
    (tmp_path / "bad_cookie.py").write_bytes(b"# coding: no-such-codec\nx = 1\n")
    assert codes(run.lint_file(tmp_path / "bom.py").findings) == []
    assert codes(run.lint_file(tmp_path / "latin.py").findings) == []
    bad = run.lint_file(tmp_path / "bad.py").findings
    assert codes(bad) == ["PTL001"] and "not valid utf-8" in bad[0].message and bad[0].line == 1
    cookie = run.lint_file(tmp_path / "bad_cookie.py").findings
    assert codes(cookie) == ["PTL001"] and "encoding" in cookie[0].message


def test_symlinks(tmp_path, run):
    target = tmp_path / "real.py"
    target.write_text("def f(w, a, b):\n    return w.T.view(a, b)\n", encoding="utf-8")
    (tmp_path / "link.py").symlink_to(target)
    (tmp_path / "dangling.py").symlink_to(tmp_path / "missing.py")
    assert codes(run.lint_file(tmp_path / "link.py").findings) == ["PTL303"]
    dangling = run.lint_file(tmp_path / "dangling.py").findings
    assert codes(dangling) == ["PTL001"] and "cannot read file" in dangling[0].message


def test_fifo_is_reported_not_read(tmp_path, run):
    fifo = tmp_path / "pipe.py"
    os.mkfifo(fifo)
    findings = run.lint_file(fifo).findings  # reading it would block forever
    assert codes(findings) == ["PTL001"] and "not a regular file" in findings[0].message


def test_unreadable_file(tmp_path, run):
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root from reading the file")
    locked = tmp_path / "locked.py"
    locked.write_text("x = 1\n", encoding="utf-8")
    locked.chmod(0)
    findings = run.lint_file(locked).findings
    assert codes(findings) == ["PTL001"] and "cannot read file" in findings[0].message


@pytest.mark.skipif(os.geteuid() != 0, reason="covered by test_unreadable_file when not root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_unreadable_file_as_root(tmp_path):
    """As root, the permission bits bind only once the capabilities that bypass them are
    dropped (setpriv): then the whole command reports the file and lints the others."""
    locked = tmp_path / "locked.py"
    locked.write_text("x = 1\n", encoding="utf-8")
    locked.chmod(0)
    readable = tmp_path / "readable.py"
    readable.write_text("def f(:\n", encoding="utf-8")
    cmd = [
        "setpriv", "--bounding-set=-dac_override,-dac_read_search",
        sys.executable, "-m", "pithlint", "--no-cache", "--format", "json",
        str(locked), str(readable),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    findings = {Path(f["path"]).name: f for f in json.loads(proc.stdout)}
    assert findings["locked.py"]["code"] == "PTL001", proc.stdout + proc.stderr
    assert "cannot read file" in findings["locked.py"]["message"]
    assert findings["readable.py"]["code"] == "PTL001"  # the syntax error, still reported
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2  # a file that cannot be read or parsed


def test_bad_files_do_not_stop_the_others(tmp_path):
    (tmp_path / "a_bad.py").write_bytes(b"x = '\xff'\n")
    (tmp_path / "b_broken.py").write_text("def f(:\n", encoding="utf-8")
    (tmp_path / "c_deep.py").write_text("x = " + "+".join(["a"] * 20_000) + "\n", encoding="utf-8")
    (tmp_path / "d_buggy.py").write_text(
        textwrap.dedent(
            """
            def f(w):
                n, r, k = w.shape
                return w.view(n, k, r)
            """
        ),
        encoding="utf-8",
    )
    result = subprocess.run([sys.executable, "-m", "pithlint", "."], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    for name in ("a_bad.py:1", "b_broken.py:1", "c_deep.py:1", "d_buggy.py:4"):
        assert name in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
