"""Small questions rules ask about calls, decorators and literals."""

from __future__ import annotations

import libcst as cst

from pithlint.analysis.names import ImportTable


def keyword(call: cst.Call, name: str) -> cst.Arg | None:
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == name:
            return arg
    return None


def is_true(node: cst.BaseExpression | None) -> bool:
    return isinstance(node, cst.Name) and node.value == "True"


def is_false(node: cst.BaseExpression | None) -> bool:
    return isinstance(node, cst.Name) and node.value == "False"


def call_name(imports: ImportTable, call: cst.Call) -> str | None:
    """The qualified name of the called function, resolved through imports."""
    return imports.resolve(call.func)


def decorator_target(imports: ImportTable, decorator: cst.Decorator) -> tuple[str | None, cst.Call | None]:
    """(qualified name, call node or None) for ``@name`` or ``@name(...)``."""
    expr = decorator.decorator
    if isinstance(expr, cst.Call):
        return imports.resolve(expr.func), expr
    return imports.resolve(expr), None


TORCH_COMPILE = "torch.compile"


def compile_decorator(imports: ImportTable, func: cst.FunctionDef) -> tuple[cst.Decorator, cst.Call | None] | None:
    """The ``@torch.compile`` / ``@torch.compile(...)`` decorator of ``func``, if any."""
    for decorator in func.decorators:
        name, call = decorator_target(imports, decorator)
        if name == TORCH_COMPILE:
            return decorator, call
    return None


def self_method_name(node: cst.BaseExpression) -> str | None:
    """``name`` for ``self.name``, else None."""
    if isinstance(node, cst.Attribute) and isinstance(node.value, cst.Name) and node.value.value == "self":
        return node.attr.value
    return None
