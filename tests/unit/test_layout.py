"""The layout holds: no import circle under src/, the client side runs without torch, LitServe's
internals are used in one module only, and scripts take nothing from the tests."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SRC = ROOT / "src"
# What a client machine runs: the load generators, the soak, the report, and the CLI that calls them.
CLIENT_MODULES = ["roofserve.cli", "roofserve.results", "roofserve.examples", "roofserve.machine",
                  "roofserve.load.vision", "roofserve.load.llm", "roofserve.load.soak", "roofserve.load.monitor",
                  "roofserve.load.process", "roofserve.load.crowd", "roofserve.report.markdown", "roofserve.report.plots",
                  "roofserve.sweep.ladder", "roofserve.server.env"]
# A sitecustomize that makes `import torch` fail in every Python process that starts with it on the path.
BLOCK_TORCH = '''
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked: this is the client side")
sys.meta_path.insert(0, _NoTorch())
'''


def _modules() -> dict[str, Path]:
    return {".".join(f.with_suffix("").relative_to(SRC).parts).removesuffix(".__init__"): f
            for f in SRC.rglob("*.py")}


def _imports(module: str, path: Path) -> set[str]:
    """Every module this file imports, at any depth (a lazy import inside a function counts)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: -node.level] if path.name != "__init__.py" else module.split(".")
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_import_circle_under_src():
    modules = _modules()
    graph = {m: {n for n in _imports(m, f) if n in modules and n != m and not modules[n].name == "__init__.py"}
             for m, f in modules.items()}
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_check_finds_a_circle(tmp_path, monkeypatch):
    """The walker above is not vacuous: two modules importing each other are found."""
    pkg = tmp_path / "src" / "p"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("def f():\n    from p.b import g\n")
    (pkg / "b.py").write_text("from p import a\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "src")
    with pytest.raises(AssertionError, match="p.a -> p.b -> p.a"):
        test_no_import_circle_under_src()


def test_only_server_lit_reaches_into_litserve_internals():
    users = {m for m, f in _modules().items()
             if any(n.startswith("litserve.") and n.split(".")[1] not in ("LitAPI", "LitServer")
                    for n in _imports(m, f))}
    assert users == {"roofserve.server.lit"}


def test_scripts_import_nothing_from_tests():
    for script in (ROOT / "scripts").glob("*.py"):
        assert not any(n == "tests" or n.startswith("tests.") for n in _imports("script", script)), script


def _client_python(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {"PYTHONPATH": f"{tmp_path}:{SRC}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_the_client_side_imports_no_torch(tmp_path):
    imports = "; ".join(f"import {m}" for m in CLIENT_MODULES)
    done = _client_python(tmp_path, f"{imports}; import sys; assert 'torch' not in sys.modules; print('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    blocked = _client_python(tmp_path, "import roofserve.measure.peaks")
    assert blocked.returncode != 0 and "torch is blocked" in blocked.stderr  # the block works


def test_the_report_and_help_run_without_torch(tmp_path):
    """`roofserve report` on the committed example results, and every client command's --help."""
    out = tmp_path / "report"
    code = (f"from roofserve.cli import main; import sys; "
            f"sys.exit(main(['report', '{ROOT}/docs/example-report/vision-sweep.json', "
            f"'{ROOT}/docs/example-report/llm-sweep.json', '--out', '{out}']))")
    done = _client_python(tmp_path, code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "## Vision" in (out / "report.md").read_text() and (out / "vision_throughput.png").is_file()
    for command in (["bench", "vision-api"], ["bench", "llm"], ["bench", "soak"], ["report"]):
        done = _client_python(tmp_path, f"from roofserve.cli import main; main({[*command, '--help']!r})")
        assert done.returncode == 0 and "usage: roofserve" in done.stdout, (command, done.stderr[-1000:])
