"""Where a fresh ``aqm run`` process spends its time: the libraries' import floor, then ours (not a test).

The floor is what any program that runs Qwen3-VL through ModelOpt pays before its first line of
work: ``import torch``, transformers' Qwen3-VL class, ``modelopt.torch.quantization``. Everything a
run costs on top of that is ours: our own modules, libraries only we pull in (matplotlib for the
plots), and the stages. The script measures both in fresh interpreters, with ``-X importtime``, and
prints one table (paste it into BENCHMARKS.md):

    python benchmarks/startup_split.py                      # this checkout's src/
    python benchmarks/startup_split.py --src /tmp/base/src  # another snapshot, same libraries
    python benchmarks/startup_split.py --env OMP_NUM_THREADS=1

Why CPU seconds next to wall seconds: the machines this runs on are shared, and on a loaded one
the wall time of the same import varies by a factor of two or more while its CPU time (user +
system, all threads) barely moves. Each figure is the minimum over ``--repeat`` runs (the least
disturbed one). ``-X importtime`` reports wall microseconds per module; those are minima too.

Each process records its own CPU time at marks (after each floor import; at every stage's
start and end line of the run's log) through a logging handler, so "before the first stage" and
each stage's CPU come from inside the run without changing what it does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import attrs

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "pipelines" / "tiny-qwen3-vl.toml"

FLOOR_STEPS = (
    ("import torch", "import torch"),
    ("+ transformers Qwen3-VL class", "from transformers import Qwen3VLForConditionalGeneration"),
    ("+ modelopt.torch.quantization", "import modelopt.torch.quantization"),
)
"""The floor, step by step; each row's figure includes the rows above it (one process)."""

PROBE = """\
import json, logging, resource, sys, time, warnings
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
marks = [("interpreter", cpu(), time.perf_counter())]
{body}
with open({out!r}, "w") as handle:
    json.dump({{"marks": marks, "modules": sorted(sys.modules)}}, handle)
"""

FLOOR_BODY = "warnings.simplefilter('ignore')\n" + "".join(
    f"{code}\nmarks.append(({label!r}, cpu(), time.perf_counter()))\n" for label, code in FLOOR_STEPS
)

RUN_BODY = """\
class Mark(logging.Handler):
    def emit(self, record):
        marks.append((record.getMessage(), cpu(), time.perf_counter()))
logging.getLogger("auto_quantize_model").addHandler(Mark())
from auto_quantize_model.app.cli import main
marks.append(("cli imported", cpu(), time.perf_counter()))
code = main({args!r})
marks.append(("exit", cpu(), time.perf_counter()))
assert code == 0, code
"""

CHAINS = (
    ("torch._dynamo", "transformers' masking_utils (generation utils); modelopt.torch imports it too"),
    ("torch.distributed.tensor", "transformers' activations -> hub_kernels -> core_model_loading (DTensor)"),
    ("sympy", "torch.fx symbolic shapes, under torch.distributed.tensor"),
    ("scipy.optimize", "transformers' modeling_utils -> loss_utils -> loss_for_object_detection"),
    ("sklearn", "transformers' generation candidate_generator, when scikit-learn is installed"),
    ("torch._inductor.compile_fx", "ModelOpt's @torch.compile on algorithms._get_log_softmax_dist"),
    ("modelopt.torch.quantization.plugins.huggingface", "ModelOpt's HF plugin (needed: HF modules)"),
    ("transformers.trainer", "ModelOpt's HF Trainer plugins (modelopt.torch.opt.plugins.transformers)"),
    ("megatron.core", "ModelOpt's Megatron plugins, when megatron-core is installed"),
    ("matplotlib.figure", "our plots (WriteReports with plots on)"),
)
"""Import chains worth naming: whether each process loads them and what ``-X importtime`` says."""

IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)\s*$")
STAGE_START = re.compile(r"^\[(\d+)/\d+\] (\w+) \.\.\.$")
STAGE_DONE = re.compile(r"^\[(\d+)/\d+\] (\w+) done in ")
OURS = "auto_quantize_model"


@attrs.frozen
class ImportRow:
    """One ``-X importtime`` line: self and cumulative seconds, nesting depth, module."""

    self_s: float
    cumulative_s: float
    depth: int
    module: str


@attrs.frozen
class Sample:
    """One fresh process: its wall and CPU seconds, its marks and its import lines."""

    wall: float
    cpu: float
    marks: tuple[tuple[str, float, float], ...]
    imports: tuple[ImportRow, ...]
    modules: frozenset[str]
    """Every module loaded at the end: ``-X importtime`` misses those that ``importlib.import_module``
    loads as parents of a dotted name (transformers' lazy modules do that)."""


def parse_importtime(stderr: str) -> tuple[ImportRow, ...]:
    rows = []
    for line in stderr.splitlines():
        match = IMPORT_LINE.match(line)
        if match:
            rows.append(ImportRow(int(match[1]) / 1e6, int(match[2]) / 1e6, len(match[3]) // 2, match[4]))
    return tuple(rows)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sample(python: str, body: str, env: Mapping[str, str], cwd: Path) -> Sample:
    """Run ``body`` in a fresh ``python -X importtime``; its figures, or exit with its stderr."""
    with tempfile.TemporaryDirectory(prefix="startup-split-") as scratch:
        marks_file = Path(scratch) / "marks.json"
        script = PROBE.format(body=body.replace("{scratch}", scratch), out=str(marks_file))
        cpu_before, started = children_cpu(), time.perf_counter()
        done = subprocess.run(
            [python, "-X", "importtime", "-c", script], env=env, cwd=cwd, capture_output=True, text=True
        )
        wall, cpu = time.perf_counter() - started, children_cpu() - cpu_before
        if done.returncode != 0:
            sys.exit(f"the measured process failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        found = json.loads(marks_file.read_text())
    marks = tuple((str(m[0]), float(m[1]), float(m[2])) for m in found["marks"])
    modules = frozenset(found["modules"])
    # -X importtime also prints imports that failed (ModelOpt probes for optional libraries)
    imports = tuple(row for row in parse_importtime(done.stderr) if row.module in modules)
    return Sample(wall, cpu, marks, imports, modules)


def run_body(pipeline: Path) -> str:
    args = ["run", str(pipeline), "--output", "{scratch}/run"]
    return RUN_BODY.format(args=args)


# ----------------------------------------------------------------------------------------- figures


def mark_cpu(marks: Sequence[tuple[str, float, float]], label: str) -> float:
    for name, cpu, _ in marks:
        if name == label:
            return cpu
    raise KeyError(label)


def stage_spans(marks: Sequence[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """(stage, CPU s, wall s) of each stage, from its start and done lines."""
    started: dict[str, tuple[float, float]] = {}
    spans = []
    for message, cpu, wall in marks:
        if match := STAGE_START.match(message):
            started[match[2]] = (cpu, wall)
        elif (match := STAGE_DONE.match(message)) and match[2] in started:
            cpu0, wall0 = started.pop(match[2])
            spans.append((match[2], cpu - cpu0, wall - wall0))
    return spans


def mark_wall(marks: Sequence[tuple[str, float, float]], label: str) -> float:
    """Wall seconds from the interpreter's first mark to ``label``."""
    for name, _, wall in marks:
        if name == label:
            return wall - marks[0][2]
    raise KeyError(label)


def last_stage_done(marks: Sequence[tuple[str, float, float]]) -> tuple[float, float]:
    """CPU and wall (since the interpreter's first mark) at the last stage's done line."""
    done = [(cpu, wall - marks[0][2]) for message, cpu, wall in marks if STAGE_DONE.match(message)]
    if not done:
        raise ValueError("the run logged no finished stage")
    return done[-1]


def first_stage(marks: Sequence[tuple[str, float, float]]) -> tuple[float, float]:
    """CPU and wall (since the interpreter's first mark) at the first stage's start line."""
    wall0 = marks[0][2]
    for message, cpu, wall in marks:
        if STAGE_START.match(message):
            return cpu, wall - wall0
    raise ValueError("the run logged no stage")


def min_imports(samples: Iterable[Sample]) -> dict[str, ImportRow]:
    """Each module's smallest self and cumulative time over the samples (its depth from the first)."""
    best: dict[str, ImportRow] = {}
    for one in samples:
        for row in one.imports:
            old = best.get(row.module)
            if old is None:
                best[row.module] = row
            else:
                best[row.module] = ImportRow(
                    min(old.self_s, row.self_s),
                    min(old.cumulative_s, row.cumulative_s),
                    old.depth,
                    row.module,
                )
    return best


def group_of(module: str, floor: set[str]) -> str:
    if module.split(".")[0] == OURS:
        return "ours: auto_quantize_model"
    if module in floor:
        return "floor modules (imported by the floor too)"
    return f"not in the floor: {module.split('.')[0]}"


# ------------------------------------------------------------------------------------------ output


def table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...], align: str = "") -> str:
    """A Markdown table; ``align`` has one ``l`` or ``r`` per column (default: the first left, the rest
    right)."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def cell(text: str, width: int, side: str) -> str:
        return text.ljust(width) if side == "l" else text.rjust(width)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell(c, w, a) for c, w, a in zip(cells, widths, align, strict=True)) + " |"

    rule = (
        "|"
        + "|".join(
            "-" * (w + 2) if a == "l" else "-" * (w + 1) + ":" for w, a in zip(widths, align, strict=True)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def report(floor: Sequence[Sample], runs: Sequence[Sample], top: int) -> str:
    out: list[str] = []
    floor_cpu = min(s.cpu for s in floor)
    floor_wall = min(s.wall for s in floor)
    run_cpu = min(s.cpu for s in runs)
    run_wall = min(s.wall for s in runs)
    floor_imports, run_imports = min_imports(floor), min_imports(runs)
    floor_names = set(floor_imports).union(*(s.modules for s in floor))

    rows: list[tuple[str, ...]] = []
    labels = ["interpreter", *(label for label, _ in FLOOR_STEPS)]
    for label in labels:
        cpu = min(mark_cpu(s.marks, label) for s in floor)
        wall = min(mark_wall(s.marks, label) for s in floor)
        rows.append((label, f"{cpu:.2f}", f"{wall:.2f}"))
    imports_cpu = min(mark_cpu(s.marks, labels[-1]) for s in floor)
    imports_wall = min(mark_wall(s.marks, labels[-1]) for s in floor)
    rows.append(("floor, whole process (exit included)", f"{floor_cpu:.2f}", f"{floor_wall:.2f}"))
    rows.append(("aqm run, whole process", f"{run_cpu:.2f}", f"{run_wall:.2f}"))
    before_cpu = min(first_stage(s.marks)[0] for s in runs)
    before_wall = min(first_stage(s.marks)[1] for s in runs)
    rows.append(("  before the first stage", f"{before_cpu:.2f}", f"{before_wall:.2f}"))
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for one in runs:
        for name, cpu, wall in stage_spans(one.marks):
            spans[name].append((cpu, wall))
    for name, values in spans.items():
        rows.append(
            (f"  stage {name}", f"{min(c for c, _ in values):.2f}", f"{min(w for _, w in values):.2f}")
        )
    after_cpu = min(s.cpu - last_stage_done(s.marks)[0] for s in runs)
    after_wall = min(s.wall - last_stage_done(s.marks)[1] for s in runs)
    rows.append(("  after the last stage (summary, exit)", f"{after_cpu:.2f}", f"{after_wall:.2f}"))
    rows.append(
        (
            "ours = run - floor (whole processes)",
            f"{run_cpu - floor_cpu:+.2f}",
            f"{run_wall - floor_wall:+.2f}",
        )
    )
    rows.append(
        (
            "ours before the first stage (- floor imports)",
            f"{before_cpu - imports_cpu:+.2f}",
            f"{before_wall - imports_wall:+.2f}",
        )
    )
    modules = (
        f"modules loaded: floor {min(len(s.modules) for s in floor)}, run {min(len(s.modules) for s in runs)}"
    )
    out += [
        "Process (seconds; each the minimum of the repeats)",
        "",
        table(rows, ("part", "CPU", "wall")),
        "",
        modules,
        "",
    ]

    groups: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for row in run_imports.values():
        key = group_of(row.module, floor_names)
        groups[key] += row.self_s
        counts[key] += 1
    floor_total = sum(r.self_s for r in floor_imports.values())
    split = [("the floor process, all modules", str(len(floor_imports)), f"{floor_total:.2f}")]
    split += [(k, str(counts[k]), f"{v:.2f}") for k, v in sorted(groups.items(), key=lambda kv: -kv[1])[:12]]
    split.append(("aqm run, all modules", str(len(run_imports)), f"{sum(groups.values()):.2f}"))
    out += [
        "-X importtime of the run, self time summed by who pulls the module in (wall s)",
        "",
        table(split, ("modules", "count", "self")),
        "",
    ]

    def top_rows(rows: Iterable[ImportRow]) -> list[tuple[str, ...]]:
        ranked = sorted(rows, key=lambda r: -r.cumulative_s)[:top]
        return [(r.module, f"{r.cumulative_s:.2f}", f"{r.self_s:.2f}") for r in ranked]

    firsts = [r for r in run_imports.values() if r.depth == 0]
    out += [
        f"Top {top} imports of the run by cumulative time (first-level imports, i.e. one per import point)",
        "",
        table(top_rows(firsts), ("module", "cumulative", "self")),
        "",
    ]

    def loaded(imports: Mapping[str, ImportRow], samples: Sequence[Sample], module: str) -> str:
        if not any(module in s.modules for s in samples):
            return "-"
        return f"{imports[module].cumulative_s:.2f}" if module in imports else "loaded, untimed"

    chain_rows = [
        (module, loaded(floor_imports, floor, module), loaded(run_imports, runs, module), why)
        for module, why in CHAINS
    ]
    out += [
        "Named chains: cumulative -X importtime (wall s) in each process, '-' when not loaded",
        "",
        table(chain_rows, ("module", "floor", "run", "pulled in by"), "lrrl"),
        "",
    ]
    extra = [r for r in run_imports.values() if r.module not in floor_names]
    out += [
        f"Top {top} imports of the run that the floor does not make",
        "",
        table(top_rows(extra), ("module", "cumulative", "self")),
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the package's source folder")
    parser.add_argument("--pipeline", type=Path, default=TINY, help="pipeline file to run")
    parser.add_argument("--python", default=sys.executable, help="interpreter (with the libraries)")
    parser.add_argument("--repeat", type=int, default=3, help="processes of each kind; minima are shown")
    parser.add_argument("--top", type=int, default=10, help="rows of the top-imports tables")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment")
    args = parser.parse_args(argv)

    # the given src/ first; whatever else the caller put on the path (libraries installed with
    # pip --target, as on the GPU machine) stays behind it
    inherited = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(args.src.resolve()), *inherited]))
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    print(f"src {args.src.resolve()}; {args.repeat} repeats; {', '.join(args.env) or 'no extra env'}")
    floor: list[Sample] = []
    runs: list[Sample] = []
    for index in range(args.repeat):
        load = os.getloadavg()[0]
        floor.append(sample(args.python, FLOOR_BODY, env, REPO))
        runs.append(sample(args.python, run_body(args.pipeline.resolve()), env, REPO))
        print(
            f"repeat {index + 1}: load {load:.1f}; floor {floor[-1].cpu:.2f} s CPU / {floor[-1].wall:.2f} s; "
            f"run {runs[-1].cpu:.2f} s CPU / {runs[-1].wall:.2f} s",
            flush=True,
        )
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(report(floor, runs, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
