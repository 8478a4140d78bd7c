"""Writing the mix at one budget: a ModelOpt config and, asked, a checkpoint read back.

Shared by the ``ExportCheckpoint`` stage (a pipeline's ``[export]`` table) and ``aqm export`` (a
finished run folder): the choice at a budget comes from the frontier solver (the same one-budget
solve SolveBudgets runs), and :func:`export_mix` writes a folder's files and ``export.json``.
Writing goes into a scratch folder next to the target that is moved into place only once every
file is there and read back (:mod:`auto_quantize_model.io.staged`: an earlier export there loses
only the files it recorded). It used to be the stage module's other half, which made the CLI
import a stage to print a summary line.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auto_quantize_model.artifacts import (
    BudgetFrontier,
    CheckpointInputs,
    ExportedMix,
    SensitivityScores,
)
from auto_quantize_model.core.ct_config import (
    COMPRESSED_TENSORS,
    MODELOPT,
    check_checkpoint_format,
    ct_export_format,
)
from auto_quantize_model.core.export_choice import GroupChoice, choices_at
from auto_quantize_model.core.export_labels import export_format
from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.io.atomic import LinkRefused
from auto_quantize_model.io.staged import (
    files_below,
    place,
    recorded_files,
    refuse_links,
    scratch_beside,
)

log = logging.getLogger("auto_quantize_model")

EXPORT_FILE = "export.json"
"""What an export folder holds and, with a checkpoint, the read-back figures."""

CONFIG_ONLY_DEVICE = "cuda"
"""The device a config-only export is checked for: nothing is quantized here, and the written
config runs wherever ModelOpt has the format's kernels (NVFP4 needs CUDA; that check belongs to
the checkpoint, which is made on the model's own device)."""


def choice_at(
    budget_frontier: BudgetFrontier, budget: float, groups: Sequence[Any]
) -> tuple[tuple[GroupChoice, ...], float]:
    """Every group's format at ``budget`` and the mix's LM bits; ConfigError for an unreachable budget."""
    choices = choices_at(budget_frontier.frontier, budget, groups)
    return choices, budget_frontier.frontier.point(budget).effective_bits_lm


def solve_one(scores: SensitivityScores, budget: float) -> BudgetFrontier:
    """SolveBudgets' solve at one budget (the run's own budget is solved and checked as well)."""
    from auto_quantize_model.core.frontier_points import search_method, search_space, solve_budgets

    space, notes = search_space(
        scores.groups,
        search_method(scores.method, "SensitivityScores"),
        order=scores.search_order,
        fixed=scores.fixed_groups,
    )
    return solve_budgets(
        space,
        (budget,),
        run_budget=scores.effective_bits_target,
        run_choice=scores.groups,
        workers=1,
        notes=notes,
        routing=scores.routing,
        rare_expert_tokens=scores.rare_expert_tokens,
        cost_model=scores.cost_model,
    )


def previous_export(target: Path) -> tuple[str, ...] | None:
    """The files an earlier aqm export recorded in ``target/export.json``; None without a readable one."""
    return recorded_files(target, EXPORT_FILE)


def refuse_taken(target: Path, force: bool) -> tuple[str, ...]:
    """Check that ``target`` may receive an export; returns the earlier export's files ``force`` replaces.

    A new or empty folder is fine. A folder holding an earlier aqm export (its ``export.json``)
    is replaced with ``force``, and then only the files that export recorded; anything else in it
    stays. A folder with files and no export record is never written into, ``--force`` or not.
    """
    if target.is_symlink():
        raise LinkRefused(f"export output {target} is a symbolic link; give the real folder")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"export output {target} exists and is a file; give a folder")
    if not target.is_dir():
        return ()
    present = sorted(p.name for p in target.iterdir())
    if not present:
        return ()
    previous = previous_export(target)
    if previous is None:
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        only = "--force replaces only an earlier aqm export; " if force else ""
        raise ConfigError(
            f"export output {target} holds files aqm did not write ({shown}) and no {EXPORT_FILE}; "
            f"{only}choose a new or empty folder"
        )
    if not force:
        raise ConfigError(
            f"export output {target} already holds an aqm export ({len(previous)} files recorded in its "
            f"{EXPORT_FILE}); choose a new folder, or pass --force to replace those files (nothing else "
            "there is touched)"
        )
    refuse_links(target, previous)
    return previous


def export_mix(
    choices: Sequence[GroupChoice],
    target: Path,
    *,
    budget: float,
    effective_bits_lm: float,
    checkpoint: CheckpointInputs | None = None,
    force: bool = False,
    notes: Sequence[str] = (),
    checkpoint_format: str = MODELOPT,
) -> ExportedMix:
    """Write ``choices`` to ``target``: config files, README, ``export.json`` and, asked, the checkpoint.

    Everything is written into a scratch folder beside ``target`` and renamed into place once it is
    complete; a failure leaves ``target`` as it was. With ``checkpoint``, the fresh model is
    quantized with the config, calibrated on the run's batches, exported by ModelOpt's HF exporter
    and loaded back; ``export.json`` records the held-out NLL of the in-memory, exported and
    read-back models. A read-back outside tolerance is an AqmError after the files are in place
    (they are the evidence). ``checkpoint_format`` ``compressed-tensors`` writes the checkpoint with
    compressed-tensors instead (:mod:`~auto_quantize_model.backend.export_ct`); its formats are
    checked before anything is loaded or written, and it needs ``checkpoint``.
    """
    from auto_quantize_model.backend import export_ct
    from auto_quantize_model.backend.modelopt import quant_config as qc

    compressed = checkpoint_format == COMPRESSED_TENSORS
    if compressed or checkpoint is not None:
        check_checkpoint_format(choices, checkpoint_format)
    if compressed and checkpoint is None:
        raise ConfigError(
            "--format compressed-tensors writes a checkpoint (the weights are the format): add --checkpoint"
        )
    exportable = ct_export_format if compressed else export_format
    started = time.perf_counter()
    shown, target = target, target.absolute()
    if target.name in ("", "..") or target.name.endswith(".."):
        target = target.resolve()  # `--output .` / `..`: a folder with a name to stage beside
    previous = refuse_taken(target, force)
    if checkpoint is not None:
        config = qc.prepare_export(
            choices,
            device=checkpoint.fresh.device,
            vision_prefixes=checkpoint.lm.vision_modules,
            known_modules=qc.linear_modules(checkpoint.fresh.model),
            exportable=exportable,
        )
    else:
        config = qc.prepare_export(choices, device=CONFIG_ONLY_DEVICE)
    with scratch_beside(target, "export") as scratch:
        qc.write_quant_config(config, scratch)
        figures: dict[str, Any] = {}
        extra_notes: tuple[str, ...] = ()
        if checkpoint is not None:
            from auto_quantize_model.backend.modelopt.patches import fake_quant_kernels

            write = export_ct.write_ct_checkpoint if compressed else _write_checkpoint
            with fake_quant_kernels(checkpoint.kernels):
                figures, extra_notes = write(config, scratch, checkpoint)
        counts: dict[str, int] = {}
        for choice in choices:
            counts[choice.format] = counts.get(choice.format, 0) + 1
        mix = ExportedMix(
            directory=str(shown),
            budget=budget,
            effective_bits_lm=effective_bits_lm,
            groups=len(choices),
            quantized_layers=len(config.quantized),
            formats=tuple(sorted(counts.items())),
            files=tuple(sorted({*files_below(scratch), EXPORT_FILE})),
            checkpoint=checkpoint is not None,
            seconds=time.perf_counter() - started,
            notes=(*notes, *extra_notes),
            **figures,
        )
        (scratch / EXPORT_FILE).write_text(export_json(mix), encoding="utf-8")
        place(scratch, target, previous)
    if not mix.ok and compressed:
        raise AqmError(export_ct.failure_line(mix, target))
    if not mix.ok:
        raise AqmError(
            f"{target}: the exported checkpoint reads back {mix.difference:+.2e} nats/token off the "
            f"written model (tolerance {mix.tolerance:.0e}); the figures are in {target / EXPORT_FILE}"
        )
    return mix


def _write_checkpoint(
    config: Any, out: Path, inputs: CheckpointInputs
) -> tuple[dict[str, Any], tuple[str, ...]]:
    from auto_quantize_model.backend.export_check import export_check
    from auto_quantize_model.backend.modelopt import export as ex
    from auto_quantize_model.backend.modelopt.quant_config import write_readme
    from auto_quantize_model.backend.modelopt.read_back import read_back_nll, read_back_tolerance

    fresh = inputs.fresh
    check = export_check(inputs)
    held_out, evaluate = check.held_out, check.evaluate
    written = ex.export_checkpoint(
        fresh.model,
        fresh.tokenizer,
        config,
        inputs.calib.batches,
        check.calibration_step,
        out,
        evaluate=evaluate,
    )
    started = time.perf_counter()
    back = read_back_nll(written, evaluate, device=fresh.device)
    log.info(
        "export: quantized in %.1f s, exported in %.1f s, read back in %.1f s",
        written.quantize_seconds,
        written.export_seconds,
        time.perf_counter() - started,
    )
    checked = (
        f"Read back with load_exported: held-out NLL {back.read_back_nll:.6f} nats/token against "
        f"{back.exported_nll:.6f} for the quantized model computing with the written weights, on "
        f"{check.data.describe()}; difference {back.difference:+.1e}, tolerance {back.tolerance:.0e}.",
        f"ModelOpt's exporter rounds weights otherwise than its fake quantizer: the fake-quantized "
        f"model's NLL {back.fused_nll:.6f}, the written weights' {back.exported_nll:.6f} "
        f"({back.exporter_shift:+.1e}); decoded weights of {back.sampled_layers} quantized layers "
        f"against the fake-quantized ones: {back.flipped:,} of {back.flip_weights:,} differ beyond float "
        f"rounding (largest {back.flip_relative:.1e} of the layer's largest weight).",
    )
    usual = read_back_tolerance(back.dtype)
    if abs(back.exporter_shift) > usual:
        log.warning(
            "export: ModelOpt's exporter moved the held-out NLL %+.1e nats/token from the fake-quantized "
            "model it was given (more than the %.0e measured on small models): the checkpoint holds "
            "what it wrote, read back correctly; the frontier's figures are for the fake-quantized model",
            back.exporter_shift,
            usual,
        )
    write_readme(out, config, (*written.notes, *checked))  # the exporter's README, with what was checked
    figures = {
        "quant_algo": written.quant_algo,
        **back.figures(),
        "flip_layers": back.sampled_layers,
        **check.data.figures(),
    }
    return figures, (*written.notes, *held_out.notes)


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def export_json(mix: ExportedMix) -> str:
    """``export.json``: the budget, the mix and, with a checkpoint, the read-back figures."""
    record: dict[str, Any] = {
        "format": mix.format,
        "budget": mix.budget,
        "effective_bits_lm": mix.effective_bits_lm,
        "groups": mix.groups,
        "quantized_layers": mix.quantized_layers,
        "formats": dict(mix.formats),
        "files": list(mix.files),
        "checkpoint": mix.checkpoint,
        "seconds": round(mix.seconds, 3),
        "notes": list(mix.notes),
    }
    if mix.checkpoint:
        record["read_back"] = {
            "quant_algo": mix.quant_algo,
            "in_memory_nll": _number(mix.in_memory_nll),
            "exported_nll": _number(mix.exported_nll),
            "read_back_nll": _number(mix.read_back_nll),
            "difference": _number(mix.difference),
            "tolerance": _number(mix.tolerance),
            "ok": mix.ok,
            "held_out": {
                "data": mix.held_out,
                "samples": mix.held_out_samples,
                "scored_tokens": mix.held_out_tokens,
                "image_tokens": mix.held_out_image_tokens,
            },
        }
        if mix.format == COMPRESSED_TENSORS:
            from auto_quantize_model.backend.export_ct import weights_record

            record["read_back"].update(loader=mix.loader, weights=weights_record(mix))
        else:
            record["read_back"]["weights_sample"] = {
                "layers": mix.flip_layers,
                "differing": mix.flipped_weights,
                "of": mix.flip_weights,
                "largest_relative": mix.flip_relative,
                "against": "the fake-quantized weights after ModelOpt's fusion (a diagnostic, not a gate)",
            }
            record["read_back"]["exporter_rounding"] = {
                "fused_fake_quant_nll": _number(mix.fused_nll),
                "written_weights_nll": _number(mix.exported_nll),
                "shift": _number(mix.exported_nll - mix.fused_nll),
            }
    return json.dumps(record, indent=2) + "\n"


def summary_line(mix: ExportedMix) -> str:
    """One line for logs and the CLI: where, the budget, the mix and, with a checkpoint, the read-back."""
    quantized = sum(count for name, count in mix.formats if name != NO_QUANT)
    text = (
        f"export {mix.directory}: {mix.budget:g}-bit budget, {mix.effective_bits_lm:.3f} LM bits, "
        f"{quantized}/{mix.groups} groups quantized ({mix.quantized_layers} layers)"
    )
    if mix.checkpoint:
        text += (
            f"; {mix.quant_algo} {mix.format} checkpoint, held-out NLL ({mix.held_out_samples} "
            f"{mix.held_out}) {mix.in_memory_nll:.5f} in memory, "
            f"{mix.exported_nll:.5f} exported, {mix.read_back_nll:.5f} read back "
            f"(difference {mix.difference:+.1e}, tolerance {mix.tolerance:.0e}, "
            f"{'ok' if mix.ok else 'FAILED'})"
        )
    return text + f" in {mix.seconds:.1f} s"
