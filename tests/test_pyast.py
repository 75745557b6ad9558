"""pithlint.analysis.pyast answers as libcst does: the project index and the Hugging Face facts
read files with CPython's ast, and a finding they place must land exactly where libcst's
PositionProvider puts it."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import libcst as cst
import pytest

from pithlint.analysis import pyast
from pithlint.analysis.names import dotted_name
from pithlint.analysis.positions import code_ranges
from pithlint.analysis.walk import walk
from pithlint.project import string_value

REPO = Path(__file__).resolve().parent.parent
FILES = [
    REPO / "pithtrain" / "models" / "deepseek_v2.py",
    REPO / "tests" / "test_fsdp.py",
    REPO / "pithtrain" / "tasks" / "convert_checkpoint.py",
    REPO / "rules" / "checkpoint.py",
]

# Constructs where ast and libcst disagree unless pyast makes up the difference.
TRICKY = textwrap.dedent(
    '''
    import a.b.c as d, e.f
    from .g.h import i as j, k
    x = ("a"  "b"
         f"c{d['k']:>{w}}" "e")
    y = f"""
    {g["q"]} {h("r",
      "s")}"""
    z = "é" "ü" + 'x' "y", b"z" b'w'
    async def  spaced(p, /, q: int = 1, *r, s="d"  # comment
                      "e", **t) -> "ret":
        global u
        return {"k": "v", **other, "k2": ("p"
            "q")}, call(key=h(), *i(), **j()).attr.sub
    def \\
      continued(y): pass
    @deco("dec" "orator")
    class  K(Base, metaclass=Meta):
        ann: "A" = 'v' f'{1}' 'tail'
    match config.model_type:
        case "a":
            v = (A, B)
        case ("b"):
            v = ( A , B , ), (C,), ()
        case (
            "c"
        ):
            v = ((A, B))
        case "d": pass
    if é == 1 and (x for x in y):
        pass
    elif ü:
        pass
    '''
).lstrip("\n")


def sources():
    yield "tricky", TRICKY
    for path in FILES:
        if path.is_file():
            yield path.name, path.read_text(encoding="utf-8")


def libcst_ranges(module: cst.Module, nodes) -> list[tuple[int, int, int, int]]:
    ranges = code_ranges(module, nodes)
    return [(r.start.line, r.start.column, r.end.line, r.end.column) for r in (ranges[n] for n in nodes)]


@pytest.mark.parametrize(("name", "source"), list(sources()), ids=lambda v: v if len(v) < 40 else "")
def test_string_literals_are_libcsts(name, source):
    module = cst.parse_module(source)
    expected = [(n, string_value(n)) for n in walk(module) if string_value(n) is not None]
    text = pyast.Source(source)
    found = text.string_literals(ast.parse(source))
    assert [v for _, v in found] == [v for _, v in expected]
    assert [text.position(a) for a, _ in found] == libcst_ranges(module, [n for n, _ in expected])


@pytest.mark.parametrize(("name", "source"), list(sources()), ids=lambda v: v if len(v) < 40 else "")
def test_anchor_positions_are_libcsts(name, source):
    """The nodes a cross-file finding points at: def and class names, if statements, case
    blocks, tuples (with or without parentheses, a trailing comma, empty), calls, names."""
    module, tree, text = cst.parse_module(source), ast.parse(source), pyast.Source(source)
    pairs = [
        ((cst.FunctionDef, cst.ClassDef), (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef), lambda n: n.name, pyast.NameOf),
        (cst.MatchCase, ast.match_case, None, None),
        (cst.If, ast.If, None, None),
        (cst.Call, ast.Call, None, None),
        (cst.Tuple, ast.Tuple, None, None),
        (cst.GeneratorExp, ast.GeneratorExp, None, None),
    ]
    in_subscript = {id(n.slice) for n in ast.walk(tree) if isinstance(n, ast.Subscript)}  # no Tuple in libcst
    for cst_type, ast_type, cst_anchor, ast_anchor in pairs:
        ours = [n for n in pyast.walk(tree) if isinstance(n, ast_type) and not (ast_type is ast.Tuple and id(n) in in_subscript)]
        theirs = [n for n in walk(module) if isinstance(n, cst_type)]
        theirs = [cst_anchor(n) for n in theirs] if cst_anchor else theirs
        ours = [ast_anchor(n) for n in ours] if ast_anchor else ours
        assert sorted(text.position(n) for n in ours) == sorted(libcst_ranges(module, theirs)), cst_type


@pytest.mark.parametrize(("name", "source"), list(sources()), ids=lambda v: v if len(v) < 40 else "")
def test_names_and_walk_order_are_libcsts(name, source):
    module, tree = cst.parse_module(source), ast.parse(source)
    names = {dotted_name(n) for n in walk(module) if isinstance(n, (cst.Name, cst.Attribute))} - {None}
    assert pyast.libcst_names(tree) == names
    # The order calls are met in decides "the first" and "the last" of several matches.
    calls = [dotted_name(n.func) for n in walk(module) if isinstance(n, cst.Call)]
    assert [pyast.dotted_name(n.func) for n in pyast.walk(tree) if isinstance(n, ast.Call)] == calls


def test_simple_strings_and_one_line_suites():
    source = 'f("a", "b" "c", f"d", b"e")\nclass A: x = 1\nclass B:\n    x = 1\n'
    tree, text = ast.parse(source), pyast.Source(source)
    args = tree.body[0].value.args
    assert [text.is_simple_string(a) for a in args] == [True, False, False, False]
    assert [text.one_line_suite(c.body) for c in tree.body[1:]] == [True, False]
    assert text.simple_strings(tree.body[0]) == ["a", "b", "c"]


def test_cpython_parses_the_linted_model_file_once(monkeypatch):
    """The depth check, the project index and the Hugging Face comparison all read the linted
    file with CPython's parser; pyast.parse hands them one tree (a parse is ~3 ms a file)."""
    from pithlint.config import load_settings
    from pithlint.engine import LintRun

    repo = Path(__file__).resolve().parents[1]
    model = repo / "pithtrain" / "models" / "deepseek_v2.py"
    text = model.read_text(encoding="utf-8")
    assert len(text) > 16_000  # large enough for the depth check to parse it
    parsed = []
    real_parse = ast.parse

    def counting_parse(source, *args, **kwargs):
        parsed.append(source)
        return real_parse(source, *args, **kwargs)

    monkeypatch.setattr(ast, "parse", counting_parse)
    pyast.parse.cache_clear()
    LintRun.create(load_settings(None, repo), select=["ALL"]).lint_file(model)
    assert parsed.count(text) == 1
