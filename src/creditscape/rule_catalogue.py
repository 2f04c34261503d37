"""The built-in rules as ``creditscape rules`` lists them, read from the source of the rule
modules without importing them: importing JAX takes over a second, and a listing should answer at
once. ``tests/test_cli.py`` checks that this reading equals the registry."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

_RULES = Path(__file__).parent / "rules"


class RuleEntry(NamedTuple):
    name: str
    formula: str
    forms: tuple[str, ...]
    options: dict  # the rule's dataclass fields and their defaults


def builtin_rules() -> list[RuleEntry]:
    """Every class decorated with ``@register`` in the rule modules, in registration order (the
    order in which ``creditscape/rules/__init__.py`` imports the modules, then source order).
    Class attributes and option defaults are inherited from base classes as Python would."""
    package = ast.parse((_RULES / "__init__.py").read_text(encoding="utf-8"))
    modules = dict.fromkeys(node.module.rsplit(".", 1)[1] for node in package.body if isinstance(node, ast.ImportFrom))
    classes: dict[str, dict] = {}
    entries = []
    for module in modules:
        for node in ast.parse((_RULES / f"{module}.py").read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ClassDef):
                continue
            seen = {"options": {}}
            for base in node.bases:
                if isinstance(base, ast.Name) and base.id in classes:
                    seen = {**classes[base.id], "options": dict(classes[base.id]["options"])}
            for statement in node.body:
                if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(
                        statement.targets[0], ast.Name) and statement.targets[0].id in ("name", "formula", "forms"):
                    seen[statement.targets[0].id] = ast.literal_eval(statement.value)
                elif (isinstance(statement, ast.AnnAssign) and statement.value is not None
                      and "ClassVar" not in ast.unparse(statement.annotation)):
                    seen["options"][statement.target.id] = ast.literal_eval(statement.value)
            classes[node.name] = seen
            if any(isinstance(d, ast.Name) and d.id == "register" for d in node.decorator_list):
                entries.append(RuleEntry(seen["name"], seen["formula"], tuple(seen["forms"]), seen["options"]))
    return entries
