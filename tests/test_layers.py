"""The import layers of the package (the ``[importlinter]`` contracts in setup.cfg): kept by the package, broken by a
planted upward import, and no function-local import of the package's own modules left to hide a cycle."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "simlap_hf"

# Function-local imports of the package's own modules that are there for a reason other than a cycle:
# {(importing module, imported module): why}.
LOCAL_IMPORTS_WITH_A_REASON: dict[tuple[str, str], str] = {
    ("simlap_hf.data.pipeline", "simlap_hf.data.dataset"): "imports the optional datasets library",
    ("simlap_hf.data.pipeline", "simlap_hf.data.streaming"): "imports the optional datasets library",
}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package found under ``root``, with the contracts of the repository's setup.cfg."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]
        + [str(REPO / "setup.cfg"), "--no-cache", "--no-logo"],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=300,
    )


def test_package_keeps_its_layers():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout
    assert result.stdout.count("KEPT") >= 2


@pytest.mark.parametrize(
    ("module", "planted", "expected"),
    [
        # the model folder must not reach the training code (a saved folder could not load without the package)
        (
            "losses.py",
            "from .training import arguments\n",
            "simlap_hf.losses is not allowed to import simlap_hf.training",
        ),
        # inside training: the loop may not reach up to the job
        (
            "training/outputs.py",
            "from . import job\n",
            "simlap_hf.training.outputs is not allowed to import simlap_hf.training.job",
        ),
        # inside data: a reader's label code may not reach up to the pipeline (the cycle prepare_data once made)
        (
            "data/labels.py",
            "from . import pipeline\n",
            "simlap_hf.data.labels is not allowed to import simlap_hf.data.pipeline",
        ),
    ],
)
def test_a_planted_upward_import_breaks_the_contract(tmp_path, module, planted, expected):
    copy = tmp_path / "simlap_hf"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    source = target.read_text()
    future = "from __future__ import annotations\n"
    assert future in source
    target.write_text(source.replace(future, future + planted, 1))
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert expected in " ".join(result.stdout.split()), result.stdout[-3000:]


def _own_module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not node.level:
        return [node.module or ""]
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return [".".join([*base, *([node.module] if node.module else [])])]


def function_local_package_imports() -> dict[tuple[str, str], int]:
    """``{(importing module, imported simlap_hf module): line}`` for every import inside a function body."""
    found: dict[tuple[str, str], int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "metrics" in path.relative_to(PACKAGE).parts:  # evaluate metric scripts, loaded by path
            continue
        importer = _own_module(path)
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for imported in _imported_modules(node, importer, path.name == "__init__.py"):
                        if imported == "simlap_hf" or imported.startswith("simlap_hf."):
                            found.setdefault((importer, imported), node.lineno)
    return found


def test_no_function_local_import_of_the_package_without_a_reason():
    found = function_local_package_imports()
    unexplained = {key: line for key, line in found.items() if key not in LOCAL_IMPORTS_WITH_A_REASON}
    assert not unexplained, (
        "function-local imports of the package's own modules (move them to the top of the module; the import "
        f"contracts say whether that is allowed): {unexplained}"
    )


def test_the_local_import_check_sees_a_planted_one(tmp_path, monkeypatch):
    copy = tmp_path / "simlap_hf"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "relations.py").write_text(
        (copy / "relations.py").read_text()
        + "\n\ndef _planted():\n    from .analysis import gates\n\n    return gates\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert ("simlap_hf.relations", "simlap_hf.analysis") in function_local_package_imports()
