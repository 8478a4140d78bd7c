"""The ``RunAutoQuant`` stage."""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from auto_quantize_model.artifacts import CalibData, LanguageModel, SensitivityScores
from auto_quantize_model.backend.modelopt.autoquant import (
    RAW_SCORES_SUFFIX,
    SETTINGS_SUFFIX,
    STATE_FILE,
    ForwardCounter,
    _input_device,
    _matching_layers,
    _named_custom_formats,
    _quantizable_weights,
    _scoring_phase,
    _to_device,
    _turn_off_checkpointing,
    checkpoint_file,
    collect_raw_scores,
    cuda_extension_built,
    frozen_heap,
    import_off_stack,
    leading_steps,
    limit_scored_captions,
    lm_membership,
    model_constraint,
    nonfinite_message,
    register_textlm_support,
    scores_from_state,
    settings_mismatch,
    textlm_name_map,
)
from auto_quantize_model.core import formats as fmt
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.io.atomic import atomic_write_text
from auto_quantize_model.specs import AutoQuantSpec

if TYPE_CHECKING:
    from torch import nn

    from auto_quantize_model.pipeline import Artifacts

log = logging.getLogger("auto_quantize_model")


@attrs.frozen
class RunAutoQuant:
    """Score every LM recipe group with ModelOpt AutoQuant (GPU stage; also runs on CPU).

    Mutates the model in place: ModelOpt's quantizers and per-group recipe choices stay on the
    modules (ValidateSensitivity reuses them), set to the formats the search picked. Every module
    is left in eval mode with gradient checkpointing off, whatever ModelOpt switched on.
    """

    requires: ClassVar[tuple[type, ...]] = (LanguageModel, CalibData)
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = SensitivityScores
    spec: AutoQuantSpec = attrs.field(factory=AutoQuantSpec)

    def run(self, inputs: Artifacts) -> SensitivityScores:
        lm = inputs.get(LanguageModel)
        calib = inputs.get(CalibData)
        spec = self.spec
        device = _input_device(lm)
        self._check(calib, device.type)

        score_steps, score_samples = leading_steps(calib.captions_per_batch, spec.score_size)
        calib_steps, calib_samples = leading_steps(calib.captions_per_batch, spec.calib_size)
        available = sum(calib.captions_per_batch)
        for what, size in (("score_size", spec.score_size), ("calib_size", spec.calib_size)):
            if size is not None and size > available:
                log.warning(
                    "autoquant.%s %d exceeds the %d calibration captions; using all of them",
                    what,
                    size,
                    available,
                )

        from auto_quantize_model.backend.lm_forward import (
            TextLM,
            calibration_step_for,
            decoder_and_head,
            forward_step_for,
            target_index,
        )

        mtq = import_off_stack("modelopt.torch.quantization")

        if lm.scope == "language_model":
            root: nn.Module = TextLM(lm.module, lm.lm_head)
            name_map = textlm_name_map(lm.prefix, lm.head_name)
            is_lm: Callable[[str], bool] = lambda name: True  # noqa: E731
            disabled = _matching_layers(root, name_map, spec.disabled_layers)
            other_weights = 0
            lm_weights = _quantizable_weights(root, lambda name: False)
            register_textlm_support()
        else:
            root = lm.full_model
            name_map = lambda name: name  # noqa: E731
            is_lm = lm_membership(lm.prefix, lm.head_name)
            vision = [pattern for v in lm.vision_modules for pattern in (v, f"{v}.*")]
            disabled = vision + _matching_layers(root, name_map, spec.disabled_layers)
            lm_weights = _quantizable_weights(root, lambda name: not is_lm(name))
            other_weights = _quantizable_weights(root, is_lm)
        if lm_weights == 0:
            raise AqmError("the language model has no linear layers for AutoQuant to quantize")
        constraint = model_constraint(spec.effective_bits, lm_weights, other_weights)

        state_path = self._prepare_checkpoint(lm, calib, calib_steps, score_steps)
        scored, score_samples = limit_scored_captions(
            calib.batches, calib.captions_per_batch, score_steps, spec.score_size, lm.pad_token_id
        )
        batches = [_to_device(batch, device) for batch in calib.batches]
        # calibration sees every caption; scoring sees the label-limited copies
        score_view = {
            id(batches[i]): _to_device(scored[i], device)
            for i in range(score_steps)
            if scored[i] is not calib.batches[i]
        }
        scored_targets = sum(int(target_index(batch)[1].numel()) for batch in scored[:score_steps])
        counter = ForwardCounter(
            forward_step_for(lm, root), score_view, calibration_step=calibration_step_for(lm, root)
        )
        forward_step = counter.step
        method_args: dict[str, Any] = {"method": spec.method}
        if spec.method == "gradient":
            # a sum over tokens with one constant divisor: every scored token weighs the same
            # whichever batch holds it, so packed, padded and one-caption-per-batch score alike
            method_args["forward_backward_step"] = counter.backward_step_for(
                *decoder_and_head(lm, root), normalizer=max(1, scored_targets)
            )

        if device.type == "cuda" and not cuda_extension_built():
            log.info(
                "ModelOpt's CUDA extension is not built on this machine yet (or its cache is "
                "unreadable): its first use JIT-builds it, about a minute, once per machine"
            )
        log.info(
            "AutoQuant: %s on %s (%s scope), %s, effective bits %g over the LM%s; calibration %d batch(es) "
            "/ %d captions, scoring %d batch(es) / %d captions",
            "+".join(spec.formats),
            device,
            lm.scope,
            spec.method,
            spec.effective_bits,
            f" (constraint {constraint:.4f} over the whole model)" if other_weights else "",
            calib_steps,
            calib_samples,
            score_steps,
            score_samples,
        )
        root.eval()
        # Nothing in ModelOpt's search is known to draw random numbers; seeded anyway so that a
        # future one cannot make two runs of the same inputs differ.
        import torch

        torch.manual_seed(0)
        started = time.perf_counter()
        try:
            with (
                _named_custom_formats(spec.formats) as quantization_formats,
                warnings.catch_warnings(),
                _scoring_phase(counter),
                frozen_heap(),
            ):
                warnings.filterwarnings("ignore", message="AutoQuantize: Huggingface model detected.*")
                _, state = mtq.auto_quantize(
                    root,
                    constraints={"effective_bits": constraint},
                    quantization_formats=quantization_formats,
                    data_loader=batches,
                    forward_step=forward_step,
                    disabled_layers=disabled or None,
                    num_calib_steps=calib_steps,
                    num_score_steps=score_steps,
                    verbose=False,
                    checkpoint=state_path,
                    **method_args,
                )
        finally:
            counter.remove_hooks()
            _turn_off_checkpointing(lm.full_model)
            _turn_off_checkpointing(root)
        seconds = time.perf_counter() - started
        log.info("AutoQuant forward steps: calibration %d, scoring %d", counter.calibration, counter.scoring)

        raw_file = Path(checkpoint_file(state_path))
        raw_file = raw_file.with_name(raw_file.name + RAW_SCORES_SUFFIX)
        raw: dict[str, dict[str, float]] | None = None
        if counter.scoring:
            raw = collect_raw_scores(root)
            atomic_write_text(raw_file, json.dumps(raw, sort_keys=True))
        elif raw_file.is_file():  # scores restored from the checkpoint: read what that run saw
            raw = json.loads(raw_file.read_text(encoding="utf-8"))
        summary = scores_from_state(state, name_map, is_lm, raw)
        if summary.method != spec.method:
            raise AqmError(f"ModelOpt ran method {summary.method!r}, asked for {spec.method!r}")
        if summary.nonfinite:
            if not spec.allow_nonfinite:
                raise AqmError(nonfinite_message(summary.nonfinite))
            log.warning("%s (kept: allow_nonfinite)", nonfinite_message(summary.nonfinite).split(";")[0])
        if other_weights and abs(summary.other_weights - other_weights) > 0.5:
            log.warning(
                "AutoQuant costed %d non-LM weights, %d were expected: the LM effective bits may miss the "
                "target slightly",
                int(summary.other_weights),
                other_weights,
            )
        if not summary.satisfied:
            log.warning("AutoQuant found no choice meeting the effective-bits constraint")
        log.info(
            "AutoQuant: %d LM groups scored in %.1f s; effective bits %.3f (LM), %.3f (all costed weights)",
            len(summary.groups),
            seconds,
            summary.effective_bits_lm,
            summary.effective_bits_model,
        )
        return SensitivityScores(
            groups=summary.groups,
            formats=tuple(spec.formats),
            method=spec.method,
            scope=lm.scope,
            effective_bits_target=spec.effective_bits,
            effective_bits_lm=summary.effective_bits_lm,
            effective_bits_model=summary.effective_bits_model,
            total_score=summary.total_score,
            satisfied=summary.satisfied,
            calib_steps=calib_steps,
            score_steps=score_steps,
            score_samples=score_samples,
            autoquant_seconds=seconds,
            state_path=checkpoint_file(state_path),
            calib_forward_steps=counter.calibration,
            score_forward_steps=counter.scoring,
        )

    def _check(self, calib: CalibData, device: str) -> None:
        spec = self.spec
        fmt.check_formats(spec.formats, device)
        fmt.check_effective_bits(spec.effective_bits, spec.formats)
        if spec.method not in ("gradient", "kl_div"):
            raise ConfigError(f"autoquant.method must be 'gradient' or 'kl_div', got {spec.method!r}")
        for key, value in (("score_size", spec.score_size), ("calib_size", spec.calib_size)):
            if value is not None and not value > 0:
                raise ConfigError(f"autoquant.{key} must be > 0, got {value}")
        if not calib.batches or sum(calib.captions_per_batch) == 0:
            raise ConfigError("AutoQuant got no calibration batches: the captions produced no tokens")
        if len(calib.captions_per_batch) != len(calib.batches):
            raise ValueError("CalibData.captions_per_batch does not match its batches")

    def _settings(
        self, lm: LanguageModel, calib: CalibData, calib_steps: int, score_steps: int
    ) -> dict[str, Any]:
        """What the saved calibration and scores depend on (the budget is not: it is re-searched)."""
        spec = self.spec
        stats = calib.stats
        return {
            "formats": list(spec.formats),
            "method": spec.method,
            "scope": lm.scope,
            "disabled_layers": list(spec.disabled_layers),
            "calib_steps": calib_steps,
            "score_steps": score_steps,
            "captions_sha256": stats.captions_sha256,
            "layout": stats.layout,
            "seq_len": stats.seq_len,
            "batch_size": stats.batch_size,
            "samples": stats.samples,
            "real_tokens": stats.real_tokens,
        }

    def _prepare_checkpoint(
        self, lm: LanguageModel, calib: CalibData, calib_steps: int, score_steps: int
    ) -> str:
        """The checkpoint path to hand ModelOpt; refuses one saved under other settings."""
        path = self.spec.checkpoint
        if path is None:
            # nowhere asked for: keep it for this process (WriteReports may still copy it), no longer
            scratch = tempfile.mkdtemp(prefix="aqm-autoquant-")
            atexit.register(shutil.rmtree, scratch, ignore_errors=True)
            path = str(Path(scratch) / STATE_FILE)
        real = Path(checkpoint_file(path))
        record = real.with_name(real.name + SETTINGS_SUFFIX)
        current = self._settings(lm, calib, calib_steps, score_steps)
        if real.exists():
            if not record.exists():
                raise ConfigError(
                    f"autoquant.checkpoint {real} has no settings record ({record.name}), so it cannot be "
                    "told apart from a run with other data; delete it or point autoquant.checkpoint elsewhere"
                )
            saved = json.loads(record.read_text(encoding="utf-8"))
            changed = settings_mismatch(saved, current)
            if changed:
                raise ConfigError(
                    f"autoquant.checkpoint {real} was saved with other settings ({'; '.join(changed)}); "
                    "delete it or point autoquant.checkpoint elsewhere"
                )
            log.info("AutoQuant: resuming from %s (saved calibration and scores are reused)", real)
        else:
            record.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(record, json.dumps(current, indent=1, sort_keys=True) + "\n")
        return path
