"""The layering contracts of .importlinter hold (IR < quant math < passes < runtime < pipelines <
tools, qgraph never imports passes, no import cycles), and the library defers no import but
the optional ones."""
import ast
import re
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = {"ncnn", "graphviz", "onnx", "onnxruntime"}  # may be imported inside a function, with a comment saying why


def test_import_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True) == 0


def test_library_imports_sit_at_the_top_of_modules():
    deferred = []
    for path in sorted((ROOT / "qgraph").rglob("*.py")) + sorted((ROOT / "passes").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top_level:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if not all(name.split(".")[0] in OPTIONAL for name in names):
                    deferred.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert deferred == []


def test_optional_imports_say_why():
    for path in (ROOT / "qgraph").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s+(import|from) (ncnn|graphviz|onnx|onnxruntime)\b", line):
                assert "#" in line, f"{path.relative_to(ROOT)}:{number}: say why the import is deferred"
