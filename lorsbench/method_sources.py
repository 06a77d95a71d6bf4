"""What the report needs from the method plug-ins, read from their source without importing them (the report
runs without torch): each registered method's `report_order`. The contract test checks it against the classes."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

DEFAULT_REPORT_ORDER = 1000  # Method.report_order when a method sets none


def methods_folder() -> Path:
    """The folder of the `lorsbench.methods` plug-ins (installed, or the checkout's top-level `methods/`)."""
    try:
        spec = importlib.util.find_spec("lorsbench.methods")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "methods"


def _registered_orders(tree: ast.Module) -> dict[str, int]:
    found = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        names = [d.args[0].value for d in node.decorator_list
                 if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register_method"
                 and d.args and isinstance(d.args[0], ast.Constant)]
        orders = [s.value.value for s in node.body if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant)
                  and any(getattr(t, "id", None) == "report_order" for t in s.targets)]
        for name in names:
            found[name] = orders[0] if orders else DEFAULT_REPORT_ORDER
    return found


def report_orders() -> dict[str, int]:
    """Registered method name -> its `report_order` (lorsbench.report sorts table rows by it)."""
    orders: dict[str, int] = {}
    for path in sorted(methods_folder().glob("*.py")):
        if not path.name.startswith("_"):
            orders.update(_registered_orders(ast.parse(path.read_text())))
    return orders
