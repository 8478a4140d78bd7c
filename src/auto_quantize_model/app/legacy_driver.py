"""``aqm qwen3-lm-int8``: the previous tool's LM-only INT8 driver, same flags and file names.

Its flags become a pipeline (:func:`legacy_raw_spec`) that runs like any other through the run
service; afterwards the reports are also copied under the previous tool's names, so scripts
written against that tool keep finding them. Errors name the flag the user typed next to the
pipeline key.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auto_quantize_model.app.folders import new_run_dir, output_error
from auto_quantize_model.errors import AqmError, ConfigError, InputError

if TYPE_CHECKING:
    from auto_quantize_model.app.run_service import RunService

LEGACY_SCHEME = "int8_autoquant_lm_default"
LEGACY_ALIASES = (
    ("per-layer-sensitivity.md", "layer-sensitivity-report.md"),
    ("per-layer-sensitivity.json", "layer-sensitivity-report.json"),
)
"""The previous driver's report names, written as copies of ours."""

_LEGACY_FLAGS = {
    "model.path": "--model-dir",
    "model.device": "--device",
    "calib.captions": "--captions-path",
    "calib.max_samples": "--max-calib-samples",
    "calib.seq_len": "--calib-seq-len",
    "calib.batch_size": "--batch-size",
    "autoquant.effective_bits": "--effective-bits",
    "autoquant.score_size": "--auto-quantize-score-size",
}


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``qwen3-lm-int8`` with the previous driver's flags and defaults."""
    legacy = sub.add_parser(
        "qwen3-lm-int8",
        parents=[common],
        help="the previous tool's LM-only INT8 driver, same flags",
        description=(
            "INT8 W8A8 (INT8_DEFAULT_CFG) AutoQuant sensitivity of the Qwen3-VL language model with the "
            f"previous driver's flags and file names (scheme {LEGACY_SCHEME}). Calibration uses the padded "
            "layout by default, like the previous tool, so scores compare with its numbers; "
            "--layout packed is faster."
        ),
    )
    legacy.add_argument("--model-dir", help="Hugging Face checkpoint folder")
    legacy.add_argument("--output-dir", help="output folder (default: runs/<time>-qwen3-lm-int8)")
    legacy.add_argument("--captions-path", default="builtin", help="captions text file (default: bundled)")
    legacy.add_argument("--max-calib-samples", type=int, default=512)
    legacy.add_argument("--calib-seq-len", type=int, default=512)
    legacy.add_argument("--batch-size", type=int, default=8)
    legacy.add_argument("--device", default="cuda")
    legacy.add_argument("--effective-bits", type=float, default=8.0)
    legacy.add_argument("--auto-quantize-score-size", type=int, default=128)
    legacy.add_argument("--report-only", action="store_true", help="regenerate reports from the manifest")
    legacy.add_argument("--layout", choices=("padded", "packed"), default="padded")
    legacy.add_argument("--force", action="store_true", help="write into a folder that already holds a run")
    legacy.set_defaults(func=cmd_qwen3_lm_int8)


def _in_flag_terms(err: AqmError) -> AqmError:
    """Name the flag the user typed next to the pipeline key in each line of ``err``."""
    text = str(err)
    for key, flag in _LEGACY_FLAGS.items():
        text = text.replace(f"{key}:", f"{flag} ({key}):")
    if text == str(err) or type(err) not in {ConfigError, InputError, AqmError}:
        return err
    return type(err)(text)


def legacy_raw_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline the previous LM-only INT8 driver ran, as a raw table (before path resolution)."""
    return {
        "model": {"path": args.model_dir, "device": args.device},
        "extract": {"scope": "language_model"},
        "calib": {
            "captions": args.captions_path,
            "max_samples": args.max_calib_samples,
            "seq_len": args.calib_seq_len,
            "batch_size": args.batch_size,
            "layout": args.layout,
        },
        "autoquant": {
            "formats": ["INT8_DEFAULT_CFG"],
            "method": "gradient",
            "effective_bits": args.effective_bits,
            "score_size": args.auto_quantize_score_size,
        },
        "manifest": {"scheme": LEGACY_SCHEME},
        "reports": {"save_state": True},
    }


def legacy_aliases(folder: Path) -> list[Path]:
    """Copy our reports under the previous tool's names; returns the copies written."""
    from auto_quantize_model.io.atomic import atomic_copy

    return [
        atomic_copy(folder / ours, folder / theirs)
        for ours, theirs in LEGACY_ALIASES
        if (folder / ours).is_file()
    ]


def _find_manifest(folder: Path) -> Path:
    preferred = folder / f"{LEGACY_SCHEME}_quant_manifest.json"
    if preferred.is_file():
        return preferred
    found = sorted(folder.glob("*_quant_manifest.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(f"--report-only: no *_quant_manifest.json in {folder}")
    raise InputError(
        f"--report-only: several manifests in {folder} ({', '.join(p.name for p in found)}); "
        f"use aqm report MANIFEST"
    )


def _report_only(args: argparse.Namespace, service: RunService) -> int:
    from auto_quantize_model.app.run_steps import print_summary
    from auto_quantize_model.io.manifest_file import read_manifest

    if not args.output_dir:
        raise InputError("--report-only needs --output-dir (the folder holding the manifest)")
    folder = Path(args.output_dir)
    manifest_path = _find_manifest(folder)
    if read_manifest(manifest_path).origin == "legacy":
        raise InputError(
            f"{manifest_path} was written by the previous tool and its reports sit next to it; "
            f"regenerate them elsewhere with: aqm report {manifest_path} --output DIR"
        )
    paths = service.outputs.report(manifest_path, folder)
    files = [Path(name) for name in paths.files]
    try:
        files += legacy_aliases(folder)
    except OSError as err:
        raise output_error(folder, err) from None
    print_summary(folder, files)
    return 0


def cmd_qwen3_lm_int8(args: argparse.Namespace, service: RunService) -> int:
    if args.report_only:
        return _report_only(args, service)
    if not args.model_dir:
        raise InputError("--model-dir is required (a Qwen3-VL checkpoint folder), unless --report-only")

    from auto_quantize_model.app.run_steps import RunRequest
    from auto_quantize_model.io.pipeline_file import resolve_paths, spec_from_dict

    source = "aqm qwen3-lm-int8"
    folder = Path(args.output_dir) if args.output_dir else new_run_dir("qwen3-lm-int8")
    raw = legacy_raw_spec(args)
    # The search state lives under its final name, so WriteReports has nothing to copy.
    raw["autoquant"]["checkpoint"] = str(folder / f"{LEGACY_SCHEME}_autoquant_state.pt")
    raw = resolve_paths(raw, Path.cwd())
    try:
        request = RunRequest.of(
            spec_from_dict(raw, source=source),
            folder,
            source=source,
            force=args.force,
            command=args.command_line,
            after=legacy_aliases,
        )
    except AqmError as err:
        raise _in_flag_terms(err) from None
    return service.run(request)
