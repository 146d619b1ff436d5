"""The package layout's import rules, checked on the source (ast), so an arrow the wrong way fails a test.

model <- streaming <- server; benchmarks may use those three; omnivox (the command line) sits on
top of everything; clients know only the protocol and import none of our packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent

# What each top-level package may import of ours (besides itself).
ALLOWED: dict[str, frozenset[str]] = {
    "model": frozenset(),
    "streaming": frozenset({"model"}),
    "server": frozenset({"model", "streaming"}),
    "benchmarks": frozenset({"model", "streaming", "server"}),
    "omnivox": frozenset({"model", "streaming", "server", "benchmarks"}),
    "clients": frozenset(),
}


def our_packages() -> list[str]:
    return sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file of `module`: function-level and relative
    imports included, and importlib.import_module("literal") calls."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                assert node.level <= len(parts), f"{path}:{node.lineno}: relative import above the top package"
                base = ".".join(parts[: len(parts) - node.level + 1])
                found.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            else:
                found.append((node.lineno, node.module or ""))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def test_every_package_has_a_rule() -> None:
    packages = our_packages()
    assert set(packages) == set(ALLOWED), "a new top-level package needs its place in ALLOWED (and DESIGN.md)"
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {name.removesuffix("*") for name in include["include"]} == set(ALLOWED)  # all installed


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package: str) -> None:
    ours = set(our_packages()) | {"tests"}
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    wrong = []
    for path in files:
        for line, name in imported_modules(path, module_name(path)):
            top = name.split(".")[0]
            if top in ours and top != package and top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package]) or 'nothing'} of ours:\n" + "\n".join(wrong)


def test_the_checker_sees_relative_and_late_imports(tmp_path: Path) -> None:
    # The rules above are only as good as the parser: relative, function-level and importlib imports count.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from .app import Engine\n"
        "from .. import model\n"
        "def f():\n"
        "    from benchmarks.serve import bench_serve\n"
        "    import importlib\n"
        "    importlib.import_module('omnivox.cli')\n"
    )
    names = [name for _, name in imported_modules(probe, "clients.python.probe")]
    assert names[:2] == ["clients.python.app", "clients"]
    assert set(names[2:]) == {"benchmarks.serve", "importlib", "omnivox.cli"}
