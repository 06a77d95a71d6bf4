"""The import layering the design relies on, read from the source: the config edge imports nothing of lorsbench
but the leaf `lorsbench.errors`, the core never imports a specific method, and the phases only set `Run`'s
declared fields."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from lorsbench.pipeline import Run

PACKAGE = Path(__file__).resolve().parent.parent / "lorsbench"


def _lorsbench_imports(path: Path) -> set[str]:
    """Every lorsbench module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "lorsbench" or name.startswith("lorsbench.")}


def test_the_config_edge_imports_only_the_errors_leaf():
    assert _lorsbench_imports(PACKAGE / "config.py") == {"lorsbench.errors"}
    assert _lorsbench_imports(PACKAGE / "errors.py") == set()


def test_the_core_imports_no_specific_method():
    offenders = {str(path.relative_to(PACKAGE)): sorted(names) for path in PACKAGE.rglob("*.py")
                 if (names := {n for n in _lorsbench_imports(path) if n.startswith("lorsbench.methods")})}
    assert offenders == {}


def test_phases_set_only_declared_run_fields():
    declared = {f.name for f in dataclasses.fields(Run)}
    assigned = set()
    for name in ("pipeline.py", "schedule.py"):
        for node in ast.walk(ast.parse((PACKAGE / name).read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                for item in (target.elts if isinstance(target, ast.Tuple) else [target]):
                    if isinstance(item, ast.Attribute) and isinstance(item.value, ast.Name) and item.value.id == "run":
                        assigned.add(item.attr)
    assert assigned, "no run.<field> assignment found: the scan is broken"
    assert assigned - declared == set()
