"""The rule pack: one module per family, one class per rule.

Installed as ``pithlint.rules``. A new family module is added to FAMILIES; every Rule
subclass defined in a family module with a ``code`` is registered.
"""

from pithlint.rule import Rule
from pithlint.rules import (
    checkpoint,
    conventions,
    hf_conventions,
    hygiene,
    linter,
    model_protocol,
    numerics,
    protocol,
    router,
    torch_compile,
    wiring,
)

FAMILIES = (
    linter,
    protocol,
    model_protocol,
    router,
    torch_compile,
    numerics,
    wiring,
    conventions,
    hf_conventions,
    checkpoint,
    hygiene,
)

RULES = [
    obj
    for family in FAMILIES
    for obj in vars(family).values()
    if isinstance(obj, type) and issubclass(obj, Rule) and obj.__module__ == family.__name__ and "code" in vars(obj)
]
