"""What must stay torch-free, acyclic and layered.

Torch-free: the commands that only read files, and the pure modules behind them. Each case runs
in a fresh interpreter, because the test process itself imported torch long ago: only a new
process can tell what a command or module pulls in. ``aqm --help``, ``validate``, ``formats``,
``report`` and ``diff`` answer in well under a second only while they import no torch (about 4 s),
transformers or ModelOpt (another 12 s together).

Acyclic: the package's module-level imports. A cycle works or fails depending on which of its
modules a caller happens to import first (a half-initialised module has not yet defined the name
the other one wants), so it is read from the source with :mod:`ast`, for every module at once.
Counting every import (in functions, under ``TYPE_CHECKING``) there must be no cycle either: one
through a function only waits for the call that closes it.

Layered: nouns < core < io < render, backend < stages < bench < app < the package's own
``__init__``/``__main__`` (:data:`LAYER_OF`, :data:`LAYER_RANKS`). A module imports only from its
own layer or lower ones, wherever the import is written: a function-level import is deferred, not
allowed.
"""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
import textwrap
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

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
@pytest.mark.slow  # renders, exports or spawns for real: slow tier (fast one under a minute)
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
# Reading the imports
# --------------------------------------------------------------------------------------------------

ImportNode = ast.Import | ast.ImportFrom

MODULE_LEVEL = "module level"
UNDER_TYPE_CHECKING = "under TYPE_CHECKING"
IN_A_FUNCTION = "in a function"


class Edge(NamedTuple):
    """One import statement of a module of the package naming another, and where it is written."""

    importer: str
    target: str
    line: int
    where: str
    """:data:`MODULE_LEVEL`, :data:`UNDER_TYPE_CHECKING` or :data:`IN_A_FUNCTION`."""

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} ({self.where}) imports {self.target}"


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


def _every_import(nodes: Iterable[ast.AST], where: str = MODULE_LEVEL) -> Iterator[tuple[ImportNode, str]]:
    """Every import statement in ``nodes``, however deep, with when it runs: on import, only for a
    type checker, or when a function is called (a layer is broken all the same in each case)."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, where
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _every_import(ast.iter_child_nodes(node), IN_A_FUNCTION)
        elif isinstance(node, ast.If) and where == MODULE_LEVEL and _is_type_checking(node.test):
            yield from _every_import(node.body, UNDER_TYPE_CHECKING)
            yield from _every_import(node.orelse, where)
        else:
            yield from _every_import(ast.iter_child_nodes(node), where)


def _package_modules(src: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's ``__init__``) for every module of ``package``."""
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _named_modules(node: ImportNode, here: str, modules: Mapping[str, object]) -> list[str]:
    """The package's modules an import statement names, relative imports resolved against the
    package ``here``. ``from m import x`` names the submodule ``m.x`` when there is one, else ``m``;
    a name that is no module of the package names the nearest package above it that is."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    found: dict[str, None] = {}
    for target in targets:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target:
            found[target] = None
    return list(found)


def _edges(src: Path, package: str, *, every: bool) -> Iterator[Edge]:
    """The imports among ``package``'s modules: those run on import, or (``every``) all of them."""
    modules = _package_modules(src, package)
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        body = ast.parse(path.read_text(encoding="utf-8")).body
        found = (
            _every_import(body) if every else ((node, MODULE_LEVEL) for node in _imports_run_at_import(body))
        )
        for node, where in found:
            for target in _named_modules(node, here, modules):
                if target != name:
                    yield Edge(name, target, node.lineno, where)


def _import_graph(
    src: Path, package: str, *, every: bool = False, skip: Collection[tuple[str, str]] = ()
) -> dict[str, dict[str, Edge]]:
    """Module -> {a module of the package that importing it runs first: the import that does}.

    Importing ``a.b.c`` runs ``a`` and ``a.b`` too, so those are edges as well, except the
    importer's own parent packages (they are already being imported when it runs). Only imports
    run on import are counted, unless ``every``. ``skip`` holds (importer, target) pairs left out.
    """
    graph: dict[str, dict[str, Edge]] = {name: {} for name in _package_modules(src, package)}
    for edge in _edges(src, package, every=every):
        if (edge.importer, edge.target) in skip:
            continue
        parents = {".".join(edge.importer.split(".")[:i]) for i in range(1, edge.importer.count(".") + 1)}
        parts = edge.target.split(".")
        for end in range(1, len(parts) + 1):
            step = ".".join(parts[:end])
            if step in graph and step != edge.importer and step not in parents:
                graph[edge.importer].setdefault(step, edge)
    return graph


# --------------------------------------------------------------------------------------------------
# Import cycles
# --------------------------------------------------------------------------------------------------


def _a_cycle(graph: Mapping[str, Collection[str]]) -> list[str] | None:
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


def _cycle_text(cycle: Sequence[str], graph: Mapping[str, Mapping[str, Edge]]) -> str:
    """The imports that close ``cycle``, each with its file line and where it is written."""
    steps = []
    for importer, step in itertools.pairwise(cycle):
        edge = graph[importer][step]
        steps.append(str(edge) if edge.target == step else f"{edge} (which runs {step} first)")
    return ", then ".join(steps)


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
    assert set(graph["pkg.a"]) == {"pkg.b"}
    assert set(graph["pkg.b"]) == set()
    assert set(graph["pkg.sub.c"]) == {"pkg.b"}  # its own package pkg.sub is not an edge
    assert _a_cycle(graph) is None
    (package / "b.py").write_text(
        "try:\n    import pkg.sub.c\nexcept ImportError:\n    c = None\n", encoding="utf-8"
    )
    graph = _import_graph(tmp_path, "pkg")
    assert set(graph["pkg.b"]) == {"pkg.sub", "pkg.sub.c"}
    assert _a_cycle(graph) == ["pkg.b", "pkg.sub", "pkg.sub.c", "pkg.b"]


def test_no_module_level_import_cycle_in_the_package() -> None:
    graph = _import_graph(REPO / "src", "auto_quantize_model")
    assert "auto_quantize_model.pipeline" in graph
    cycle = _a_cycle(graph)
    assert cycle is None, (
        f"module-level import cycle: {' -> '.join(cycle)}; move the shared definitions to the lower "
        "module, or import inside the function that needs it"
    )


def test_the_full_cycle_check_counts_imports_in_functions_and_for_type_checkers(tmp_path: Path) -> None:
    """On a made-up package: the cycles the module-level check lets through (through a function body,
    through ``if TYPE_CHECKING:``) are found, and named by file line and place."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "a.py").write_text("import os\n\n\ndef f():\n    from pkg.b import g\n", encoding="utf-8")
    (package / "b.py").write_text("from pkg import a\n", encoding="utf-8")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\nelse:\n    import json\n",
        encoding="utf-8",
    )
    (package / "d.py").write_text("class D:\n    from pkg.c import x\n", encoding="utf-8")
    assert _a_cycle(_import_graph(tmp_path, "pkg")) is None
    graph = _import_graph(tmp_path, "pkg", every=True)
    assert graph["pkg.a"] == {"pkg.b": Edge("pkg.a", "pkg.b", 5, IN_A_FUNCTION)}
    assert graph["pkg.c"] == {"pkg.d": Edge("pkg.c", "pkg.d", 3, UNDER_TYPE_CHECKING)}
    assert graph["pkg.d"] == {"pkg.c": Edge("pkg.d", "pkg.c", 2, MODULE_LEVEL)}  # a class body runs on import
    cycle = _a_cycle(graph)
    assert cycle == ["pkg.a", "pkg.b", "pkg.a"]
    assert _cycle_text(cycle, graph) == (
        "pkg.a:5 (in a function) imports pkg.b, then pkg.b:1 (module level) imports pkg.a"
    )
    without_a = _import_graph(tmp_path, "pkg", every=True, skip={("pkg.a", "pkg.b")})
    assert _a_cycle(without_a) == ["pkg.c", "pkg.d", "pkg.c"]


def test_no_import_cycle_in_the_package_counting_every_import() -> None:
    """Function-level imports too: a cycle through them only waits for the call that closes it, and
    TYPE_CHECKING ones, since two modules that need each other's names are one module in two files."""
    graph = _import_graph(REPO / "src", "auto_quantize_model", every=True, skip=LAYER_EXCEPTIONS)
    cycle = _a_cycle(graph)
    assert cycle is None, (
        f"import cycle: {_cycle_text(cycle, graph)}; move what both need into the lower module (or a new "
        "one below both)"
    )


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------

PACKAGE = "package"
"""The layer of the package's own ``__init__`` and ``__main__``: the top."""

LAYER_RANKS: dict[str, int] = {
    "nouns": 0,
    "core": 1,
    "io": 2,
    "render": 3,
    "backend": 3,
    "stages": 4,
    "bench": 5,
    "app": 6,
    PACKAGE: 7,
}
"""Lowest first. A module imports only from its own layer and from lower ranks; render and backend
share a rank as siblings, so neither imports the other."""

LAYER_OF: dict[str, str] = {
    # The nouns: records, names and settings that every layer passes around.
    "artifacts": "nouns",
    "specs": "nouns",
    "spec_values": "nouns",
    "errors": "nouns",
    "data": "nouns",
    "pipeline": "nouns",
    "manifest_records": "nouns",
    "frontier_records": "nouns",
    "validation_records": "nouns",
    "sources": "nouns",
    "core": "core",
    "io": "io",
    "render": "render",
    "backend": "backend",
    "stages": "stages",
    "bench": "bench",
    "app": "app",
    "__main__": PACKAGE,
}
"""A module's layer, by the first part of its name below the package (a new top-level module or
subpackage must be placed here before the layer test passes)."""

LAYER_EXCEPTIONS: frozenset[tuple[str, str]] = frozenset()
"""(importer, imported) pairs that break a layer rule for now; the only ones allowed."""


def _layer_breaks(
    src: Path,
    package: str,
    layer_of: Mapping[str, str],
    ranks: Mapping[str, int],
    allowed: Collection[tuple[str, str]] = (),
) -> list[str]:
    """Every module in no layer, then every import (wherever it is written) of a module from a
    higher layer or a sibling, one sentence each."""

    def layer(module: str) -> str | None:
        return PACKAGE if module == package else layer_of.get(module.split(".")[1])

    problems = [
        f"{module} is in no layer: add {module.split('.')[1]!r} to LAYER_OF"
        for module in _package_modules(src, package)
        if layer(module) is None
    ]
    for edge in _edges(src, package, every=True):
        mine, theirs = layer(edge.importer), layer(edge.target)
        if mine is None or theirs is None or (edge.importer, edge.target) in allowed:
            continue
        if theirs == mine or ranks[theirs] < ranks[mine]:
            continue
        below = sorted((name for name in ranks if ranks[name] < ranks[mine]), key=lambda name: -ranks[name])
        relation = "its sibling" if ranks[theirs] == ranks[mine] else "a higher layer"
        problems.append(
            f"{edge}: {mine} may import only from {', '.join([mine, *below])}, not from {theirs} ({relation})"
        )
    return problems


def test_the_layer_check_sees_every_import(tmp_path: Path) -> None:
    """On a made-up package: an import from a higher layer or a sibling is found wherever it is
    written, named by module, line and rule; an allowed pair and imports downwards pass."""
    package = tmp_path / "pkg"
    for folder in ("low", "left", "right", "high"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("", encoding="utf-8")
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "nouns.py").write_text("", encoding="utf-8")
    (package / "low" / "m.py").write_text(
        "from pkg import nouns\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from pkg.high import h\n",
        encoding="utf-8",
    )
    (package / "left" / "l.py").write_text(
        "from pkg.low import m\nfrom . import l2\n\n\ndef f():\n    from pkg.right.r import x\n",
        encoding="utf-8",
    )
    (package / "left" / "l2.py").write_text("import pkg.high.h\n", encoding="utf-8")
    (package / "right" / "r.py").write_text("from ..low import m\nfrom pkg import stray\n", encoding="utf-8")
    (package / "high" / "h.py").write_text("import pkg.left.l, pkg.right.r, pkg\n", encoding="utf-8")
    (package / "stray.py").write_text("", encoding="utf-8")
    layer_of = {"nouns": "nouns", "low": "low", "left": "left", "right": "right", "high": "high"}
    ranks = {"nouns": 0, "low": 1, "left": 2, "right": 2, "high": 3, PACKAGE: 4}
    assert _layer_breaks(tmp_path, "pkg", layer_of, ranks, allowed={("pkg.left.l2", "pkg.high.h")}) == [
        "pkg.stray is in no layer: add 'stray' to LAYER_OF",
        "pkg.high.h:1 (module level) imports pkg: high may import only from high, left, right, low, nouns, "
        "not from package (a higher layer)",
        "pkg.left.l:6 (in a function) imports pkg.right.r: left may import only from left, low, nouns, "
        "not from right (its sibling)",
        "pkg.low.m:4 (under TYPE_CHECKING) imports pkg.high.h: low may import only from low, nouns, "
        "not from high (a higher layer)",
    ]


def test_every_import_keeps_to_the_layers() -> None:
    """nouns < core < io < render, backend < stages < bench < app < the package itself, for every
    import: at module level, under TYPE_CHECKING and inside functions alike."""
    problems = _layer_breaks(REPO / "src", "auto_quantize_model", LAYER_OF, LAYER_RANKS, LAYER_EXCEPTIONS)
    assert not problems, "\n".join(problems)


def test_each_layer_exception_is_still_needed() -> None:
    """An exception nobody uses any more would let the next such import through unnoticed."""
    used = {(edge.importer, edge.target) for edge in _edges(REPO / "src", "auto_quantize_model", every=True)}
    assert sorted(LAYER_EXCEPTIONS - used) == [], "no longer imported: remove them from LAYER_EXCEPTIONS"
