"""The architecture stays true without anyone policing it: each layer imports only the layers below it,
and the daemon's code never imports dev tools. Reads the package with the stdlib `ast`, runs nothing."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "agent"

# What each part of `agent` may import (besides itself and the standard library / third parties).
# The same rules stand in each package's __init__ docstring and in the README's package table (both checked below).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "clock": set(),
    "config": {"errors"},
    "wire": {"config", "errors"},
    "policy": {"wire", "config", "errors"},
    "store": set(),
    "bus": {"config", "errors"},
    "uds": {"bus", "wire", "config", "errors"},
    "core": {"uds", "bus", "policy", "wire", "config", "errors"},
    "fleet": {"wire", "policy", "store", "config", "clock", "errors"},
    "metrics": {"bus", "wire", "config", "errors"},
    "collect": {"core", "uds", "bus", "metrics", "policy", "store", "wire", "config", "errors"},
    "system": {"collect", "core", "fleet", "metrics", "store", "uds", "bus", "policy", "wire", "config", "clock",
               "errors", "discover"},
    "devtools": {"core", "uds", "bus", "wire", "config", "errors"},
    "discover": {"bus", "uds", "metrics", "wire", "config", "errors"},
    "odx": {"config", "errors"},
    "cli": {"system", "collect", "devtools", "core", "fleet", "metrics", "store", "uds", "bus", "policy", "wire",
            "config", "clock", "errors", "discover", "odx"},
}
TOP = {"", "__init__", "__main__"}  # agent/__init__.py (the version) may be imported by anyone


def part_of(module: str) -> str:
    """'agent.fleet.intake' -> 'fleet'; 'agent.errors' -> 'errors'; 'agent' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def agent_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `agent...` import in the file, including the `from agent import x` form."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "agent"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "agent":
                found += [(node.lineno, f"agent.{a.name}") for a in node.names]
            elif node.module.startswith("agent."):
                found.append((node.lineno, node.module))
    return found


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "agent." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        here = part_of(module)
        if here in TOP:
            continue
        for line, imported in agent_imports(path):
            there = part_of(imported)
            if there in TOP or there == "__version__" or there == here:
                continue
            if there not in ALLOWED[here]:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} imports {imported}")
    return found


def test_every_part_of_the_package_has_a_rule():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem not in TOP)}
    assert parts == set(ALLOWED)


def test_layers_import_only_downwards():
    assert violations() == []


def test_the_daemon_never_imports_dev_tools():
    """Stated on its own because it matters most: `sovd-edge run` ships without the simulator's weight."""
    assert not any("imports agent.devtools" in v for v in violations())
    for part, allowed in ALLOWED.items():
        if part != "cli":
            assert "devtools" not in allowed, part


@pytest.mark.parametrize("part", sorted(p for p in ALLOWED if (PACKAGE / p).is_dir()))
def test_each_package_says_its_job_and_what_it_may_import(part):
    doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text())) or ""
    assert doc, f"agent/{part}/__init__.py has no docstring"
    if part != "cli":
        assert "May import" in doc or "may import" in doc.lower(), part


def may_import(part: str) -> set[str]:
    """The parts of `agent` that a part's docstring names after "May import", up to the first `.`, `;` or
    "never" (what follows is prose about what it must not import)."""
    path = PACKAGE / part / "__init__.py" if (PACKAGE / part).is_dir() else PACKAGE / f"{part}.py"
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    said = re.split(r"may import", doc, maxsplit=1, flags=re.IGNORECASE)[-1]
    said = re.split(r"[.;]|\bnever\b", said, maxsplit=1, flags=re.IGNORECASE)[0]
    return {other for other in ALLOWED if re.search(rf"\b{other}\b", said)}


@pytest.mark.parametrize("part", sorted(p for p in ALLOWED if p != "cli"))
def test_each_docstring_names_exactly_what_allowed_lets_it_import(part):
    """The "May import" a newcomer reads is the rule enforced here, not an older one (the CLI: everything)."""
    assert may_import(part) == ALLOWED[part]


def readme_rows() -> dict[str, tuple[str, str]]:
    """The README's package table: part -> (its one job, its may-import column)."""
    readme = (PACKAGE.parent / "README.md").read_text()
    return {m[1]: (m[2], m[3]) for m in re.finditer(r"^\| `agent/(\w+)/` \| (.*) \| (.*) \|$", readme, re.MULTILINE)}


def test_the_readme_table_has_every_package_with_its_rule_and_only_modules_that_exist():
    rows = readme_rows()
    assert set(rows) == {p for p in ALLOWED if (PACKAGE / p).is_dir()}
    for part, (job, imports) in rows.items():
        if part != "cli":  # "everything"; what follows "never" is what it must not import
            assert set(re.findall(r"`(\w+)`", re.split(r"\bnever\b", imports)[0])) == ALLOWED[part], part
        for name in re.findall(r"`([\w/]+\.py|\w+/)`", job):
            assert (PACKAGE / part / name).exists(), f"README names agent/{part}/{name}"


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The rule can fail: a fake package whose wire layer imports the fleet link is reported."""
    fake = tmp_path / "agent"
    for part in ALLOWED:
        if part in ("errors", "clock"):
            (fake / f"{part}.py").parent.mkdir(parents=True, exist_ok=True)
            (fake / f"{part}.py").write_text("")
        else:
            (fake / part).mkdir(parents=True, exist_ok=True)
            (fake / part / "__init__.py").write_text('"""x. May import: nothing."""\n')
    (fake / "__init__.py").write_text("")
    (fake / "wire" / "bad.py").write_text("from agent.fleet import link\nfrom agent import store\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert violations() == ["agent/wire/bad.py:1: wire imports agent.fleet",
                            "agent/wire/bad.py:2: wire imports agent.store"]
