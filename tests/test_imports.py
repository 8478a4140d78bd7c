"""What must stay torch-free, and what must stay acyclic.

Torch-free: the commands that only read files, and the pure modules behind them. Each case runs
in a fresh interpreter, because the test process itself imported torch long ago: only a new
process can tell what a command or module pulls in. ``aqm --help``, ``validate``, ``formats``,
``report`` and ``diff`` answer in well under a second only while they import no torch (about 4 s),
transformers or ModelOpt (another 12 s together).

Acyclic: the package's module-level imports. A cycle works or fails depending on which of its
modules a caller happens to import first (a half-initialised module has not yet defined the name
the other one wants), so it is read from the source with :mod:`ast`, for every module at once.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from auto_quantize_model.render.reports import write_reports
from builders import descending, manifest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "pipelines" / "tiny-qwen3-vl.toml"
HEAVY = ("torch", "transformers", "modelopt")

RUNNER = """\
import contextlib, io, json, sys
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
{code}
    except SystemExit as stop:
        assert stop.code in (0, None), f"exit code {{stop.code}}"
print(json.dumps({{"loaded": sorted(m for m in {heavy!r} if m in sys.modules), "out": out.getvalue()}}))
"""

CLI = "from auto_quantize_model.app.cli import main\n"

# (code run in the fresh interpreter, modules it must not import, text its stdout must hold).
# ``{files}`` in the code is the folder of the ``files`` fixture: two manifests, a and b.
CASES = {
    "aqm --help": (
        CLI + "main(['--help'])",
        HEAVY,
        ("usage: aqm", "run", "validate", "report", "formats", "diff", "qwen3-lm-int8"),
    ),
    "aqm validate": (
        CLI + f"assert main(['validate', {str(TINY)!r}]) == 0",
        HEAVY,
        (f"{TINY}: OK", "ValidateSensitivity"),
    ),
    "aqm formats": (CLI + "assert main(['formats']) == 0", HEAVY, ("INT8_DEFAULT_CFG",)),
    "aqm report": (
        CLI + "assert main(['report', '{files}/a/a_quant_manifest.json', '--output', '{files}/report']) == 0",
        HEAVY,
        ("per-layer-sensitivity.md",),
    ),
    "aqm diff": (
        CLI + "assert main(['diff', '{files}/a', '{files}/b']) == 0",
        HEAVY,
        ("lm_head",),
    ),
    "bench command line": (
        "import argparse\n"
        "from auto_quantize_model.bench.command import add_bench_arguments, settings_from_args\n"
        "parser = argparse.ArgumentParser()\n"
        "add_bench_arguments(parser)\n"
        "settings_from_args(parser.parse_args(['--skip-scaling']))",
        HEAVY,
        (),
    ),
    "calibration stage module": (
        "import auto_quantize_model.stages.build_calib_loader",
        ("torch",),
        (),
    ),
    "pipeline file preflight": (
        "from auto_quantize_model.io.pipeline_file import spec_from_dict\n"
        "from auto_quantize_model.io.preflight import preflight\n"
        "raw = {'model': {'path': 'builtin:tiny-qwen3-vl', 'device': 'cpu'}}\n"
        "preflight(spec_from_dict(raw, source='t'))",
        HEAVY,
        (),
    ),
    "format registry": (
        "import auto_quantize_model.core.formats as f\n"
        "f.all_formats()\n"
        "f.check_formats(['INT8_DEFAULT_CFG', 'wint4-b128_aint8-token'], 'cpu')",
        ("torch", "modelopt"),
        (),
    ),
    "versions and report modules": (
        "import auto_quantize_model.core.ranking, auto_quantize_model.render.reports\n"
        "from auto_quantize_model.io.manifest import installed_versions\n"
        "print(installed_versions()[0][0])",
        (*HEAVY, "matplotlib"),
        ("python",),
    ),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("manifests")
    names = ["model.language_model.layers.0.mlp.down_proj", "lm_head"]
    write_reports(manifest(descending(names), scheme="a"), root / "a", plots=False)
    write_reports(manifest(descending(names[::-1]), scheme="b"), root / "b", plots=False)
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_stays_free_of_heavy_imports(case: str, files: Path) -> None:
    code, forbidden, expected = CASES[case]
    body = textwrap.indent(code.replace("{files}", str(files)), " " * 8)
    script = RUNNER.format(code=body, heavy=forbidden)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["loaded"] == [], f"{case} imported {result['loaded']}"
    for text in expected:
        assert text in result["out"], f"{case}: {text!r} not in its output:\n{result['out']}"


# --------------------------------------------------------------------------------------------------
# Module-level import cycles
# --------------------------------------------------------------------------------------------------

ImportNode = ast.Import | ast.ImportFrom


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports_run_at_import(body: Sequence[ast.stmt]) -> Iterator[ImportNode]:
    """Imports executed when the module is imported: its top level, including ``if``/``try``/``with``
    blocks and class bodies, but not function bodies or ``if TYPE_CHECKING:`` blocks."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _imports_run_at_import(node.body)
            yield from _imports_run_at_import(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _imports_run_at_import(block)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from _imports_run_at_import(node.body)


def _package_modules(src: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's ``__init__``) for every module of ``package``."""
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules that importing it runs first.

    Importing ``a.b.c`` runs ``a`` and ``a.b`` too, so those are edges as well, except the
    importer's own parent packages (they are already being imported when it runs). ``from m
    import x`` is an edge to the submodule ``m.x`` when there is one, else to ``m``.
    """
    modules = _package_modules(src, package)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges: set[str] = set()
        for node in _imports_run_at_import(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                parts = target.split(".")
                for end in range(1, len(parts) + 1):
                    step = ".".join(parts[:end])
                    if step in modules and step != name and step not in parents:
                        edges.add(step)
        graph[name] = edges
    return graph


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that ends where it starts, or None for an acyclic graph."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, on_path = [start], {start}
        pending = [iter(sorted(graph[start]))]
        while pending:
            step = next(pending[-1], None)
            if step is None:
                finished = path.pop()
                done.add(finished)
                on_path.discard(finished)
                pending.pop()
            elif step in on_path:
                return [*path[path.index(step) :], step]
            elif step not in done:
                path.append(step)
                on_path.add(step)
                pending.append(iter(sorted(graph[step])))
    return None


def test_the_cycle_check_sees_module_level_imports_only(tmp_path: Path) -> None:
    """The checker itself, on a made-up package: a cycle is found, and imports made at run time are not
    counted (a function body, ``if TYPE_CHECKING:``)."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "sub" / "__init__.py").write_text("from pkg.sub import c\n", encoding="utf-8")
    (package / "a.py").write_text("from pkg import b\n", encoding="utf-8")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
        "def later():\n    from pkg.a import x\n",
        encoding="utf-8",
    )
    (package / "sub" / "c.py").write_text("from .. import b\n", encoding="utf-8")
    graph = _import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == set()
    assert graph["pkg.sub.c"] == {"pkg.b"}  # its own package pkg.sub is not an edge
    assert _a_cycle(graph) is None
    (package / "b.py").write_text(
        "try:\n    import pkg.sub.c\nexcept ImportError:\n    c = None\n", encoding="utf-8"
    )
    graph = _import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg.sub", "pkg.sub.c"}
    assert _a_cycle(graph) == ["pkg.b", "pkg.sub", "pkg.sub.c", "pkg.b"]


def test_no_module_level_import_cycle_in_the_package() -> None:
    graph = _import_graph(REPO / "src", "auto_quantize_model")
    assert "auto_quantize_model.pipeline" in graph
    cycle = _a_cycle(graph)
    assert cycle is None, (
        f"module-level import cycle: {' -> '.join(cycle)}; move the shared definitions to the lower "
        "module, or import inside the function that needs it"
    )
