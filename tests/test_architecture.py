"""The package's shape: arrows point one way, no import cycle, no method named outside its package."""

from __future__ import annotations

import io
import re
import sys
import tokenize
from pathlib import Path

from edge_runtime import methods

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import import_graph  # noqa: E402  (scripts/import_graph.py)


def test_no_import_cycle_and_no_upward_import():
    edges = import_graph.graph(ROOT)
    assert len(edges) > 50  # the walk found the package
    assert import_graph.cycles(edges) == []
    assert import_graph.upward_imports(edges) == []


def test_cycle_detector_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_graph.cycles(edges) == [["a", "b", "c"]]


def _allowed(rel: Path, name: str) -> bool:
    """Where a method may be named: its own package, shared nets, its trainer(s) in train/."""
    parts = rel.parts
    return (parts[:3] == ("edge_runtime", "methods", name) or parts[:2] == ("edge_runtime", "nets")
            or (parts[0] == "train" and rel.name.startswith(f"{name}_")))


def _code_words(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the identifiers and string literals of a file, docstrings and
    comments excluded: what the code depends on, not what its prose cites."""
    out, prev = [], None
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.NAME:
            out.append((tok.start[0], tok.string))
        elif tok.type == tokenize.STRING and prev not in (tokenize.INDENT, tokenize.NEWLINE, tokenize.NL, None):
            out.append((tok.start[0], tok.string))
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            prev = tok.type
    return out


def test_no_module_outside_a_method_package_names_the_method():
    names = methods.names()
    assert "cfm" in names
    offenders = []
    for pkg in ("edge_runtime", "train", "calibrate", "deploy"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT)
            for name in names:
                if _allowed(rel, name):
                    continue
                word = re.compile(rf"(?<![A-Za-z0-9]){name}(?![A-Za-z0-9])", re.IGNORECASE)
                for line, text in _code_words(path):
                    if text == "ast" and name == "ast":  # Python's own ast module
                        continue
                    if word.search(text):
                        offenders.append(f"{rel}:{line}: {text[:60]}")
    assert offenders == [], "method names outside their packages:\n" + "\n".join(offenders)


def test_registry_discovers_packages_and_refuses_unknown():
    for name in methods.names():
        m = methods.get(name)
        assert m.name == name and m.modalities and set(m.modalities) <= {"rgb", "3d", "rgb+3d"}
    import pytest

    with pytest.raises(ValueError, match="unknown method 'nosuch'"):
        methods.get("nosuch")
    assert methods.default_demo() in methods.demos()


def test_reading_a_manifest_does_not_import_torch(tmp_path):
    import subprocess

    code = ("import sys, edge_runtime.bundle as b, edge_runtime.methods as m; "
            "[m.get(n) for n in m.names()]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_every_script_imports_names_the_project_still_has():
    """scripts/ are not run by CI: at least what they import from the project must exist."""
    import ast
    import importlib

    missing = []
    for script in sorted((ROOT / "scripts").glob("*.py")):
        for node in ast.parse(script.read_text()).body:
            if not (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] in ("edge_runtime", "train", "calibrate", "deploy")):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{script.name}: {node.module}.{alias.name}")
    assert not missing, missing
