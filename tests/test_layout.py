"""The package layout's rules (../shared/ARCHITECTURE.md, "Rules"), checked by reading the source with ``ast``.

Why by parsing, not importing: a rule such as "no import cycle" or "argparse only in ``__main__.py``" is about the
text of the code, lazy in-function imports included, and importing every module would cost TensorFlow's start-up and
hide imports that run only on some paths.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "ldct_tf"
MAX_TOP_LEVEL_MODULES = 16
# The node's command line is being moved into ldct_tf/node/__main__.py by another change of the layout issue; until
# it lands, its parser module is the one known exception to the argparse rule.
ARGPARSE_PENDING = {PACKAGE / "node" / "cli.py"}


def _python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path, base: Path = REPO) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path, known: set[str], base: Path = REPO) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (lazy imports count).  ``from pkg import name`` is an
    edge to ``pkg.name`` when that is a module in ``known``, else to ``pkg``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    name = _module_name(path, base)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def _graph(root: Path, prefix: str) -> dict[str, set[str]]:
    modules = {_module_name(p, root.parent): p for p in _python_files(root)}
    known = set(modules)
    return {name: {m for m in _imported(path, known, root.parent) if m in known and m != name and m.startswith(prefix)}
            for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (empty when there is none): depth-first search with colours."""
    colour, stack = {}, []

    def visit(node: str) -> list[str]:
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (found := visit(nxt)):
                return found
        colour[node] = "black"
        stack.pop()
        return []

    for start in sorted(graph):
        if start not in colour and (found := visit(start)):
            return found
    return []


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_top_level_holds_at_most_16_modules_besides_the_stage_folders():
    modules = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules


def test_no_import_cycles_between_modules_of_ldct_tf():
    cycle = _cycle(_graph(PACKAGE, "ldct_tf"))
    assert not cycle, " -> ".join(cycle)


def _files_importing(module: str) -> list[Path]:
    hits = []
    for path in _python_files(PACKAGE):
        names = _imported(path, set())
        if any(n == module or n.startswith(module + ".") for n in names):
            hits.append(path)
    return hits


def test_argparse_only_in_main_modules_and_the_cli_helper():
    allowed = {PACKAGE / "cli.py", *ARGPARSE_PENDING}
    offenders = [str(p.relative_to(REPO)) for p in _files_importing("argparse")
                 if p.name != "__main__.py" and p not in allowed]
    assert not offenders, offenders


def test_library_code_never_raises_system_exit():
    offenders = []
    for path in _python_files(PACKAGE):
        if path.name == "__main__.py" or path == PACKAGE / "cli.py" or path in ARGPARSE_PENDING:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(target, ast.Name) and target.id == "SystemExit":
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_library_code_never_imports_a_main_module():
    offenders = [str(p.relative_to(REPO)) for p in _python_files(PACKAGE)
                 if p.name != "__main__.py" and any(n.endswith("__main__") for n in _imported(p, set()))]
    assert not offenders, offenders


def _exception_classes() -> dict[str, list[str]]:
    """Class name -> its base names, for every class of ldct_tf."""
    classes = {}
    for path in _python_files(PACKAGE):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "")
                                      for b in node.bases]
    return classes


def test_every_exception_class_of_ldct_tf_derives_from_ldct_error():
    classes = _exception_classes()
    builtin = {name for name in dir(__builtins__ if isinstance(__builtins__, dict) else __builtins__)
               if isinstance(getattr(__import__("builtins"), name, None), type)
               and issubclass(getattr(__import__("builtins"), name), BaseException)}

    def reaches_ldct_error(name: str, seen: frozenset = frozenset()) -> bool:
        return name == "LdctError" or any(b in classes and b not in seen and reaches_ldct_error(b, seen | {name})
                                          for b in classes.get(name, []))

    def is_exception(name: str, seen: frozenset = frozenset()) -> bool:
        return any(b in builtin or (b in classes and b not in seen and is_exception(b, seen | {name}))
                   for b in classes.get(name, []))

    pending = {"NodeError"} if (PACKAGE / "node" / "cli.py").exists() else set()  # moves with the node's CLI
    offenders = sorted(n for n in classes if is_exception(n) and not reaches_ldct_error(n) and n not in pending)
    assert not offenders, offenders


def test_the_layout_checks_see_a_violation(tmp_path):
    """The checks above can fail: a planted cycle and a planted argparse import are found."""
    pkg = tmp_path / "ldct_tf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from ldct_tf import b\n")
    (pkg / "b.py").write_text("import argparse\nfrom ldct_tf.a import f\n")
    assert _cycle(_graph(pkg, "ldct_tf")) == ["ldct_tf.a", "ldct_tf.b", "ldct_tf.a"]
    assert "argparse" in _imported(pkg / "b.py", set(), tmp_path)


def _benchmark_imports() -> list[str]:
    bench = REPO / "benchmarks"
    offenders = []
    for path in _python_files(bench):
        for name in _imported(path, set()):
            if name.startswith("benchmarks.") and name not in ("benchmarks.harness",) \
                    and not name.startswith("benchmarks.harness."):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    return offenders


def test_benchmarks_import_no_other_benchmark_than_the_harness():
    offenders = _benchmark_imports()
    assert not offenders, offenders


def _tests_importing_benchmarks() -> list[str]:
    offenders = []
    for path in _python_files(REPO / "tests"):
        if (REPO / "tests" / "benchmarks") in path.parents:
            continue
        if any(n == "benchmarks" or n.startswith("benchmarks.") for n in _imported(path, set())):
            offenders.append(str(path.relative_to(REPO)))
    return offenders


def test_tests_import_benchmarks_only_from_the_benchmark_tests():
    offenders = _tests_importing_benchmarks()
    assert not offenders, offenders


def _readme_stages() -> list[str]:
    """Every ``python -m ldct_tf.<stage>`` command of the README (the stage, without subcommands)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return sorted(set(re.findall(r"python -m (ldct_tf\.[a-z_]+)(?![\w.])", text)))


def test_the_readme_names_each_stage_command():
    stages = _readme_stages()
    for stage in ("ldct_tf.pipeline", "ldct_tf.train", "ldct_tf.export", "ldct_tf.denoise", "ldct_tf.evaluate",
                  "ldct_tf.simulate", "ldct_tf.tune", "ldct_tf.audit", "ldct_tf.demo"):
        assert stage in stages, stage
    assert "ldct_tf.baselines" not in stages and "ldct_tf.calibration" not in stages


@pytest.mark.slow
def test_every_readme_command_answers_help():
    """``python -m ldct_tf.<stage> --help`` exits 0 for every stage command the README shows (one process each; TF's
    start-up makes this about a minute in all)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    for stage in _readme_stages():
        done = subprocess.run([sys.executable, "-m", stage, "--help"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"{stage}: {done.stderr[-2000:]}"
        assert "usage: " in done.stdout, stage
    print(f"{len(_readme_stages())} commands in {time.perf_counter() - started:.0f} s")
