"""What must stay torch-free: the commands that only read files, and the pure modules behind them.

Each case runs in a fresh interpreter, because the test process itself imported torch long ago:
only a new process can tell what a command or module pulls in. ``aqm --help``, ``validate``,
``formats``, ``report`` and ``diff`` answer in well under a second only while they import no torch
(about 4 s), transformers or ModelOpt (another 12 s together).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
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
