"""The package's layers, held to: core ← store ← http ← the integrations at the top (docs/internals.md,
"Layout"). A module imports only its own layer and those below; `config` and `errors` import nothing
of the package but each other, and everything may import them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sqla_sessions"
LAYERS = {"core": 0, "store": 1, "http": 2}
TOP = 3
BASE = {"sqla_sessions.config", "sqla_sessions.errors"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    if module in BASE:
        return -1
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def _imports(path: Path) -> set[str]:
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("sqla_sessions"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("sqla_sessions"))
    return found


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module(path)
        for target in _imports(path):
            if target == "sqla_sessions":
                continue  # the package's face (`__version__`, lazily imported names) belongs to no layer
            if _layer(target) > _layer(module) or (_layer(module) == -1 and target not in BASE):
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_the_four_layers_are_folders_and_the_public_paths_are_kept() -> None:
    assert {path.name for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").exists()} >= {
        "core", "store", "http", "django",
    }  # fmt: skip
    import importlib

    for name in ("asgi", "wsgi", "csrf", "flask", "quart", "litestar", "starlette", "dramatiq", "django"):
        importlib.import_module(f"sqla_sessions.{name}")
    from sqla_sessions.handlers import DatabaseHandler, MemoryHandler  # noqa: F401
    from sqla_sessions.locking import blocking  # noqa: F401
    from sqla_sessions.migrate import host_include_name, upgrade_with_host  # noqa: F401
