"""ValidateSensitivity: the pure parts with plain data, the stage on a tiny Qwen3-VL with real ModelOpt."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import attrs
import pytest

from auto_quantize_model.artifacts import (
    CalibData,
    CalibStats,
    LanguageModel,
    LoadedModel,
    QuantSearch,
    SensitivityScores,
)
from auto_quantize_model.core.batching import encode, holdout_columns, scorable
from auto_quantize_model.core.captions import captions_sha256, read_caption_file
from auto_quantize_model.core.noise import choose_headline
from auto_quantize_model.core.ranking import rank_groups
from auto_quantize_model.core.scores import recipe_name
from auto_quantize_model.core.validation import (
    Candidate,
    held_out_set,
    holdout_captions,
    rank_candidates,
    select_groups,
    selection_notes,
)
from auto_quantize_model.core.validation_report import rank_overlap
from auto_quantize_model.errors import AqmError, WiringError
from auto_quantize_model.pipeline import Artifacts, Pipeline
from auto_quantize_model.specs import ValidateSpec
from auto_quantize_model.stages.validate_sensitivity import ValidateSensitivity
from auto_quantize_model.validation_records import ValidationReport
from builders import NONE, fp8, group, int8, scores, search_text_lm, tiny_qwen3_vl
from fakes import FakeTokenizer, fake_loaded

if TYPE_CHECKING:
    import torch


def ranked(n: int) -> tuple[Candidate, ...]:
    """``n`` candidates ``g00``.. scored 0, 1, ... (so ``g00`` ranks last); none for ``n == 0``."""
    if n == 0:
        return ()
    candidates, _ = rank_candidates([group(f"g{i:02d}", int8(float(i)), NONE) for i in range(n)])
    return candidates


# --------------------------------------------------------------------------------------------
# Pure helpers


def test_the_measured_format_is_the_one_setting_the_manifest_importance() -> None:
    candidates, notes = rank_candidates(
        [
            group("a", fp8(0.5), int8(2.0), NONE),
            group("b", NONE),
            group("c", fp8(math.nan), int8(1.0), NONE),  # NaN importance, as in the manifest
            group("d", int8(math.nan), NONE),
        ]
    )
    assert [(c.name, c.format, c.importance) for c in candidates] == [("a", "INT8_DEFAULT_CFG", 2.0)]
    assert "1 group(s) without a quantized format" in notes[0]
    assert notes[1] == "2 group(s) with NaN scores left out: c, d"


def test_rank_candidates_orders_as_the_manifest_and_leaves_out_unmeasurable_groups() -> None:
    groups = [
        group("low", int8(1.0), NONE),
        group("high", int8(9.0), NONE),
        group("tie_b", int8(5.0), NONE),
        group("tie_a", int8(5.0), NONE),
        group("off", NONE),
        group("broken", int8(math.nan), NONE),
    ]
    candidates, notes = rank_candidates(groups)
    # ties in network order, and "broken" (NaN) keeps rank 1 although it is not measured
    assert [c.name for c in candidates] == ["high", "tie_b", "tie_a", "low"]
    assert [c.rank for c in candidates] == [2, 3, 4, 5]
    assert len(notes) == 2
    assert "without a quantized format" in notes[0]
    assert "broken" in notes[1]


def test_a_validated_group_ranks_as_in_the_manifest() -> None:
    """Ties (equal importance, zeros) in network order and NaN first, exactly as the manifest ranks."""
    groups = [
        group("zero_a", int8(0.0), NONE),
        group("tie_1", fp8(0.5), int8(3.0), NONE),
        group("vision", NONE),
        group("nan", int8(math.nan), fp8(1.0), NONE),
        group("tie_2", int8(3.0), NONE),
        group("inf", int8(math.inf), NONE),
        group("zero_b", int8(0.0), NONE),
        group("layers.10", int8(2.0), NONE),
        group("layers.2", int8(2.0), NONE),
    ]
    manifest = {g.name: g for g in rank_groups(groups)}
    candidates, _ = rank_candidates(groups)
    assert {c.name: c.rank for c in candidates} == {
        name: g.rank for name, g in manifest.items() if name not in ("nan", "vision")
    }
    assert all(c.importance == manifest[c.name].importance for c in candidates)
    assert [c.name for c in candidates] == [
        "inf", "tie_1", "tie_2", "layers.10", "layers.2", "zero_a", "zero_b"
    ]  # fmt: skip
    head = next(c for c in candidates if c.name == "tie_1")
    assert head.format == "INT8_DEFAULT_CFG"


@pytest.mark.parametrize(
    "groups",
    [
        [],
        [group("vision", NONE)],
        [group("nan", int8(math.nan), NONE), group("vision", NONE)],
        [group("inf", int8(math.inf), NONE)],
    ],
)
def test_an_empty_ranking_is_a_clear_error(groups: list[Any]) -> None:
    with pytest.raises(
        AqmError, match=r"^nothing to validate: none of the \d+ recipe group\(s\) has a finite"
    ):
        rank_candidates(groups)


def test_select_groups_sizes_disjoint_and_seeded() -> None:
    candidates = ranked(20)
    chosen = select_groups(candidates, k=3, seed=7)
    assert [c.rank for c in chosen.top] == [1, 2, 3]
    assert [c.rank for c in chosen.bottom] == [18, 19, 20]
    assert len(chosen.random) == 3
    assert all(3 < c.rank < 18 for c in chosen.random)
    assert [c.rank for c in chosen.random] == sorted(c.rank for c in chosen.random)
    names = [c.name for c, _ in chosen.labelled()]
    assert len(names) == len(set(names)) == 9
    assert select_groups(candidates, k=3, seed=7) == chosen
    draws = {tuple(c.rank for c in select_groups(candidates, k=3, seed=s).random) for s in range(10)}
    assert len(draws) > 1


@pytest.mark.parametrize(
    ("n", "k", "sizes"),
    [(0, 2, (0, 0, 0)), (1, 2, (1, 0, 0)), (3, 2, (2, 1, 0)), (5, 2, (2, 2, 1)), (6, 2, (2, 2, 2))],
)
def test_select_groups_with_few_candidates(n: int, k: int, sizes: tuple[int, int, int]) -> None:
    chosen = select_groups(ranked(n), k=k, seed=0)
    assert (len(chosen.top), len(chosen.bottom), len(chosen.random)) == sizes
    names = [c.name for c, _ in chosen.labelled()]
    assert len(names) == len(set(names))


def test_k_beyond_the_groups_is_a_note_saying_what_was_asked_and_measured() -> None:
    assert selection_notes(2, 6, select_groups(ranked(6), k=2, seed=0)) == ()
    (few,) = selection_notes(2, 5, select_groups(ranked(5), k=2, seed=0))
    assert few == (
        "validate.k = 2 asks for 2 top, 2 bottom and 2 random groups, but only 5 group(s) can be "
        "validated: measured 2 top, 2 bottom and 1 random"
    )
    (beyond,) = selection_notes(10, 3, select_groups(ranked(3), k=10, seed=0))
    assert beyond.startswith("validate.k = 10 asks for 10 top")
    assert beyond.endswith("measured 3 top, 0 bottom and 0 random; the top-k overlap uses k = 3")


def test_holdout_captions_exclude_calibration_text_and_keep_order() -> None:
    texts, skipped = holdout_captions(["a", "b ", "c", "d", "e"], ["b", "d"], limit=2, source="f.txt")
    assert texts == ("a", "c")
    assert skipped == 2
    with pytest.raises(AqmError, match=r"^f\.txt: no held-out captions left"):
        holdout_captions(["a", "b"], ["a", "b", "c"], limit=5, source="f.txt")


def _stats(path: Path, samples: int, sha: str = "") -> CalibStats:
    return CalibStats(
        captions_path=str(path),
        captions_sha256=sha,
        layout="packed",
        seq_len=32,
        batch_size=4,
        max_samples=samples,
        samples=samples,
        real_tokens=0,
        total_tokens=0,
        batches=0,
        truncated_samples=0,
    )


def _calib(path: Path, used: tuple[str, ...]) -> CalibData:
    return CalibData(
        batches=(), captions_per_batch=(), stats=_stats(path, len(used), captions_sha256(used)), captions=used
    )


def test_held_out_set_leaves_out_the_calibration_texts_it_is_handed(tmp_path: Path) -> None:
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text("one a\ntwo a\n\nthree a\nfour a\n", encoding="utf-8")
    other = tmp_path / "other.txt"
    other.write_text("four a\nthree a\nfive a\ntwo a\nsix a\n", encoding="utf-8")
    calib = _calib(calib_file, ("one a", "two a", "three a"))
    calib_file.rename(tmp_path / "moved.txt")  # validation never reads the calibration file again
    held = held_out_set(ValidateSpec(holdout_captions=str(other)), calib, FakeTokenizer())
    assert held.texts == ("four a", "five a", "six a")  # "four a" was not among the 3 calibration captions
    assert held.skipped == 2
    assert held.source == str(other)
    assert held.notes == (
        f"validate.holdout_samples = 64 asked, 3 used: {other} has 3 caption(s) calibration did not use",
    )
    (tmp_path / "moved.txt").rename(calib_file)
    held = held_out_set(ValidateSpec(holdout_captions=str(calib_file)), calib, FakeTokenizer())
    assert (held.texts, held.skipped) == (("four a",), 3)
    all_used = _calib(calib_file, ("one a", "two a", "three a", "four a"))
    with pytest.raises(AqmError, match=r"calib\.txt: no held-out captions left"):
        held_out_set(ValidateSpec(holdout_captions=str(calib_file)), all_used, FakeTokenizer())


def test_held_out_set_counts_captions_too_short_to_score(tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("one\ntwo words\nthree\nfour more words\n", encoding="utf-8")
    spec = ValidateSpec(holdout_captions=str(other), holdout_samples=3)
    held = held_out_set(spec, _calib(tmp_path / "c.txt", ("x y",)), FakeTokenizer())
    assert held.texts == ("one", "two words", "three")
    assert len(held.token_lists) == 1
    assert held.notes == (
        f"validate.holdout_samples = 3 asked, 1 used: {other} has 3 caption(s) calibration did not use, "
        "2 of them shorter than 2 tokens",
    )


def test_held_out_set_refuses_calibration_data_without_its_texts(tmp_path: Path) -> None:
    calib = CalibData(batches=(), captions_per_batch=(), stats=_stats(tmp_path / "calib.txt", 2))
    with pytest.raises(AqmError, match=r"carries 0 caption text\(s\) for 2 calibration samples"):
        held_out_set(ValidateSpec(), calib, FakeTokenizer())


def test_validation_of_scores_read_from_disk_is_refused_before_anything_runs() -> None:
    """Scores alone do not hold ModelOpt's search: validation needs RunAutoQuant's QuantSearch."""
    lm = LanguageModel(
        module=cast(Any, None),
        lm_head=cast(Any, None),
        prefix="",
        head_name="lm_head",
        full_model=cast(Any, None),
        vision_modules=(),
        scope="language_model",
        pad_token_id=0,
    )
    supplied = [
        fake_loaded(FakeTokenizer()),
        lm,
        _calib(Path("c.txt"), ("a b",)),
        scores(group("g", int8(1.0))),
    ]
    with pytest.raises(WiringError, match=r"ValidateSensitivity needs a QuantSearch artifact"):
        Pipeline([ValidateSensitivity()], supplied=supplied).check()
    search = QuantSearch(model=cast(Any, None), formats=("INT8_DEFAULT_CFG",), method="gradient")
    Pipeline([ValidateSensitivity()], supplied=[*supplied, search]).check()


def test_rank_overlap_compares_predicted_and_measured_top_k() -> None:
    candidates = ranked(4)  # importance g03 > g02 > g01 > g00
    measured = [0.1, 0.4, 0.3, math.nan]  # for g03, g02, g01, g00: NaN first, so top-2 is g00, g02
    assert rank_overlap(candidates, measured, 2) == 0.5
    assert rank_overlap(candidates, [4.0, 3.0, 2.0, 1.0], 2) == 1.0
    assert rank_overlap(candidates, [1.0, 2.0, 3.0, 4.0], 2) == 0.0
    assert rank_overlap(candidates, [1.0, 1.0, 1.0, 1.0], 2) == 1.0  # measured ties: in rank order


# --------------------------------------------------------------------------------------------
# The stage on a tiny Qwen3-VL with real ModelOpt AutoQuant

WORDS = {
    "who": ("a man", "a woman", "two children", "an old dog", "a small cat", "three birds"),
    "does": ("walks", "sits", "sleeps", "waits", "plays", "runs"),
    "where": ("near the river", "on a red bench", "in the park", "by the window", "under a tree"),
}
CALIB_SAMPLES = 24


def caption_lines() -> list[str]:
    lines = [f"{a} {b} {c} ." for a, b, c in itertools.product(*WORDS.values())]
    return lines[::3][:60]


def word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for line in caption_lines() for w in line.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]"
    )


def scores_artifact(state: dict[str, Any]) -> SensitivityScores:
    """The plain scores artifact from ModelOpt's search state, as RunAutoQuant hands it on."""
    from auto_quantize_model.backend.modelopt.plan import textlm_name_map
    from auto_quantize_model.backend.modelopt.state import scores_from_state

    offered = {recipe_name(str(r)) for entry in state["candidate_stats"].values() for r in entry["formats"]}
    reading = scores_from_state(
        state,
        textlm_name_map("model.language_model", "lm_head"),
        formats=tuple(sorted(offered - {"NONE"})),
        method="gradient",
        scope="language_model",
        effective_bits_target=8.0,
        calib_steps=2,
        score_steps=2,
        score_samples=12,
        autoquant_seconds=0.0,
    )
    return reading.scores


@attrs.frozen(eq=False)
class Run:
    """Everything a slow test needs to judge one validation run."""

    report: ValidationReport
    inputs: Artifacts
    pristine: Any
    batch: dict[str, torch.Tensor]
    logits_before: torch.Tensor
    logits_after: torch.Tensor
    weights_before: dict[str, torch.Tensor]
    weights_after: dict[str, torch.Tensor]
    recipes_before: dict[str, str]
    recipes_after: dict[str, str]


def autoquant_and_validate(tmp_path: Path, formats: list[str], spec: ValidateSpec) -> Run:
    import torch
    from modelopt.torch.opt.utils import named_hparams

    from auto_quantize_model.backend.lm_forward import as_tensors, selected_logits

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(caption_lines()) + "\n", encoding="utf-8")
    tokenizer = word_tokenizer()
    model = tiny_qwen3_vl(vocab_size=128, max_positions=256, vision_depth=1, first_special_id=120)
    pristine = copy.deepcopy(model)
    decoder, head = model.model.language_model, model.lm_head

    calib_texts = read_caption_file(captions)[:CALIB_SAMPLES]
    calib_ids = scorable(encode(tokenizer, calib_texts), 32)
    calib_batches = [as_tensors(b) for b in holdout_columns(calib_ids, pad_id=0, rows=6)]
    state = search_text_lm(decoder, head, formats, calib_batches)
    found = scores_artifact(state)
    hparams = {
        n.removesuffix(".quant_recipe"): h for n, h in named_hparams(model) if n.endswith(".quant_recipe")
    }

    lm = LanguageModel(
        module=decoder,
        lm_head=head,
        prefix="model.language_model",
        head_name="lm_head",
        full_model=model,
        vision_modules=("model.visual",),
        scope="language_model",
        pad_token_id=0,
    )
    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, source="test", architecture="Qwen3VL", dtype="float32", device="cpu"
    )
    calib = CalibData(
        batches=tuple(calib_batches),
        captions_per_batch=tuple(b["input_ids"].shape[0] for b in calib_batches),
        stats=_stats(captions, CALIB_SAMPLES, captions_sha256(calib_texts)),
        captions=calib_texts,
    )
    search = QuantSearch(model=model, formats=tuple(formats), method="gradient")
    inputs = Artifacts.of([loaded, lm, calib, found, search])

    batch = as_tensors(holdout_columns(scorable(encode(tokenizer, caption_lines()[-8:]), 32), pad_id=0)[0])

    def snapshot() -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, str]]:
        with torch.inference_mode():
            logits = selected_logits(decoder, head, batch)
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        recipes = {n: str(h.active) for n, h in hparams.items()}
        return logits, weights, recipes

    logits_before, weights_before, recipes_before = snapshot()
    report = ValidateSensitivity(attrs.evolve(spec, holdout_captions=str(captions))).run(inputs)
    logits_after, weights_after, recipes_after = snapshot()
    return Run(
        report=report,
        inputs=inputs,
        pristine=pristine,
        batch=batch,
        logits_before=logits_before,
        logits_after=logits_after,
        weights_before=weights_before,
        weights_after=weights_after,
        recipes_before=recipes_before,
        recipes_after=recipes_after,
    )


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    pytest.importorskip("modelopt.torch.quantization")
    return autoquant_and_validate(
        tmp_path_factory.mktemp("int8"),
        ["INT8_DEFAULT_CFG"],
        ValidateSpec(k=2, seed=3, holdout_samples=20, refine=3),
    )


@pytest.mark.slow
def test_correlations_are_within_range_or_nan(int8_run: Run) -> None:
    report = int8_run.report
    for value in (report.spearman_nll, report.kendall_nll, report.spearman_kl, report.kendall_kl):
        assert math.isnan(value) or -1.0 <= value <= 1.0
    assert 0.0 <= report.topk_overlap <= 1.0
    assert report.k == 2
    assert all(math.isfinite(g.delta_nll) and g.kl_div >= 0.0 for g in report.groups)
    assert any(g.kl_div > 0.0 for g in report.groups)
    assert math.isfinite(report.baseline_nll)
    assert report.seconds > 0.0


@pytest.mark.slow
def test_model_is_restored_bit_exactly(int8_run: Run) -> None:
    import torch

    assert int8_run.report.restored_exactly
    assert torch.equal(int8_run.logits_before, int8_run.logits_after)
    assert int8_run.recipes_before == int8_run.recipes_after
    assert int8_run.weights_before.keys() == int8_run.weights_after.keys()
    assert all(torch.equal(int8_run.weights_before[n], w) for n, w in int8_run.weights_after.items())


@pytest.mark.slow
def test_baseline_is_the_unquantized_model(int8_run: Run) -> None:
    """With every group on NONE the model computes what it did before AutoQuant touched it."""
    report = int8_run.report
    assert report.baseline_nll == pytest.approx(pristine_nll(int8_run), rel=1e-6)


def pristine_nll(run: Run, model: Any = None) -> float:
    """Mean held-out NLL of the model before AutoQuant (or of ``model``), computed independently."""
    import torch

    from auto_quantize_model.backend.lm_forward import as_tensors, selected_logits, target_index

    held = held_out_set(
        ValidateSpec(holdout_captions=run.report.holdout_source, holdout_samples=run.report.holdout_samples),
        run.inputs.get(CalibData),
        run.inputs.get(LoadedModel).tokenizer,
    )
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in map(as_tensors, holdout_columns(held.token_lists, pad_id=0)):
            source = run.pristine if model is None else model
            logits = selected_logits(source.model.language_model, source.lm_head, batch)
            _, targets = target_index(batch)
            nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
            total += nll.double().item()
            count += targets.numel()
    return total / count


@pytest.mark.slow
def test_held_out_captions_are_disjoint_from_calibration(int8_run: Run) -> None:
    report = int8_run.report
    calib = int8_run.inputs.get(CalibData)
    calib_text = set(read_caption_file(Path(calib.stats.captions_path))[: calib.stats.samples])
    texts = held_out_set(
        ValidateSpec(holdout_captions=report.holdout_source, holdout_samples=20),
        calib,
        int8_run.inputs.get(LoadedModel).tokenizer,
    ).texts
    assert report.holdout_excluded == CALIB_SAMPLES
    assert report.holdout_samples == len(texts) == 20
    assert not calib_text & set(texts)
    assert report.holdout_tokens == sum(len(t.split()) - 1 for t in texts)


@pytest.mark.slow
def test_selection_sizes_and_ranks(int8_run: Run) -> None:
    report = int8_run.report
    scores = int8_run.inputs.get(SensitivityScores)
    by_kind = {
        kind: [g for g in report.groups if g.selection == kind] for kind in ("top", "bottom", "random")
    }
    assert {kind: len(gs) for kind, gs in by_kind.items()} == {"top": 2, "bottom": 2, "random": 2}
    assert len({g.name for g in report.groups}) == 6
    assert sorted(g.rank for g in by_kind["top"]) == [1, 2]
    n_groups = len(scores.groups)
    assert sorted(g.rank for g in by_kind["bottom"]) == [n_groups - 1, n_groups]
    assert all(g.format == "INT8_DEFAULT_CFG" for g in report.groups)
    manifest = {g.name: g for g in rank_groups(scores.groups)}
    assert all(
        (g.rank, g.score) == (manifest[g.name].rank, manifest[g.name].importance) for g in report.groups
    )


@pytest.mark.slow
def test_settings_beyond_the_data_are_noted_not_clamped_silently(
    int8_run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    """A second validation of the same search (the first put the model back) asks for too much."""
    n_groups = len(int8_run.inputs.get(SensitivityScores).groups)
    spec = ValidateSpec(k=50, holdout_samples=1000, holdout_captions=int8_run.report.holdout_source)
    with caplog.at_level("WARNING", logger="auto_quantize_model"):
        report = ValidateSensitivity(spec).run(int8_run.inputs)
    held_out = len(caption_lines()) - CALIB_SAMPLES
    expected = (
        f"validate.k = 50 asks for 50 top, 50 bottom and 50 random groups, but only {n_groups} group(s) "
        f"can be validated: measured {n_groups} top, 0 bottom and 0 random; the top-k overlap uses "
        f"k = {n_groups}",
        f"validate.holdout_samples = 1000 asked, {held_out} used: {spec.holdout_captions} has {held_out} "
        "caption(s) calibration did not use",
    )
    assert report.unmet == expected  # listed with the run's warnings, not again among the notes
    assert not set(expected) & set(report.notes), report.notes
    assert all(f"validation: {note}" in caplog.messages for note in expected)
    assert (report.k, len(report.groups), report.holdout_samples) == (n_groups, n_groups, held_out)
    assert report.restored_exactly


@pytest.mark.slow
def test_additivity_fields_are_finite(int8_run: Run) -> None:
    report = int8_run.report
    top = [g for g in report.groups if g.selection == "top"]
    assert math.isfinite(report.joint_delta_nll)
    assert report.sum_delta_nll == pytest.approx(math.fsum(g.delta_nll for g in top))
    assert math.isfinite(report.chosen_delta_nll)


@pytest.mark.slow
def test_folded_smoothing_is_undone_for_the_baseline_and_put_back(tmp_path: Path) -> None:
    """ModelOpt folds the chosen SmoothQuant scale into the weights; the baseline must not see it."""
    import torch

    pytest.importorskip("modelopt.torch.quantization")
    run = autoquant_and_validate(
        tmp_path, ["INT8_SMOOTHQUANT_CFG", "INT8_DEFAULT_CFG"], ValidateSpec(k=1, holdout_samples=12)
    )
    report = run.report
    assert any("fold smoothing" in note for note in report.notes), report.notes
    if run.recipes_before["lm_head"].startswith("INT8_SMOOTHQUANT_CFG"):  # tied to the embedding
        assert any("model.language_model.embed_tokens.weight" in note for note in report.notes)
    assert report.baseline_nll == pytest.approx(pristine_nll(run), rel=1e-5)
    assert report.restored_exactly
    assert torch.equal(run.logits_before, run.logits_after)
    assert all(torch.equal(run.weights_before[n], w) for n, w in run.weights_after.items())
    assert {g.format for g in report.groups} <= {"INT8_SMOOTHQUANT_CFG", "INT8_DEFAULT_CFG"}

    # Without the unfolding, "no quantization" is a different model: that is what the stage avoids.
    from modelopt.torch.opt.utils import named_hparams

    model = run.inputs.get(LanguageModel).full_model
    for _, hparam in named_hparams(model, unique=True):
        hparam.active = next(r for r in hparam.choices if recipe_name(str(r)) == "NONE")
    assert abs(pristine_nll(run, model) - report.baseline_nll) > 1e-3 * report.baseline_nll


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["language_model", "full_model"])
def test_pipeline_validates_after_autoquant(
    tiny_loaded: LoadedModel, scope: Literal["language_model", "full_model"]
) -> None:
    """The real stages in a row; validation reuses what RunAutoQuant left on the model."""
    import torch

    pytest.importorskip("modelopt.torch.quantization")
    from auto_quantize_model.backend.lm_forward import selected_logits
    from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, ExtractSpec
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant

    calib_spec = CalibSpec(max_samples=24, seq_len=48, batch_size=4)
    before = Pipeline(
        [
            ExtractLM(ExtractSpec(scope=scope)),
            BuildCalibLoader(calib_spec),
            RunAutoQuant(AutoQuantSpec(score_size=8)),
        ],
        supplied=[tiny_loaded],
    ).run()
    lm = before.get(LanguageModel)
    batch = before.get(CalibData).batches[0]
    with torch.inference_mode():
        logits_before = selected_logits(lm.module, lm.lm_head, batch)
    after = Pipeline(
        # held out from the calibration file itself: the 24 calibration captions must be skipped
        [ValidateSensitivity(ValidateSpec(k=2, holdout_samples=16, holdout_captions="builtin"))],
        supplied=list(before),
    ).run()
    report = after.get(ValidationReport)
    with torch.inference_mode():
        logits_after = selected_logits(lm.module, lm.lm_head, batch)

    assert torch.equal(logits_before, logits_after)
    assert report.restored_exactly
    assert report.holdout_excluded == 24
    assert report.holdout_samples == 16
    assert report.holdout_source.endswith("captions.txt")
    assert len(report.groups) == 6
    scored = {g.name for g in before.get(SensitivityScores).groups}
    assert {g.name for g in report.groups} <= scored
    manifest = {g.name: g.rank for g in rank_groups(before.get(SensitivityScores).groups)}
    assert all(g.rank == manifest[g.name] for g in report.groups)
    assert not any(".visual" in g.name for g in report.groups)
    for value in (report.spearman_nll, report.kendall_nll, report.spearman_kl, report.kendall_kl):
        assert math.isnan(value) or -1.0 <= value <= 1.0
    assert math.isfinite(report.joint_delta_nll)
    assert math.isfinite(report.sum_delta_nll)


@pytest.mark.slow
def test_every_measurement_has_an_interval_and_the_headline_follows_the_noise(int8_run: Run) -> None:
    report = int8_run.report
    noise = report.noise
    assert noise is not None
    assert (noise.resamples, noise.confidence, noise.seed) == (1000, 0.95, 3)
    for g in report.groups:
        assert g.delta_nll_ci is not None
        assert g.kl_ci is not None
        assert g.delta_nll_ci.low <= g.delta_nll_ci.high
        assert 0.0 <= g.kl_ci.low <= g.kl_ci.high
        assert g.delta_nll_ci.contains(0.0) is (g.name in noise.nll_within_noise)
    assert (noise.headline, noise.headline_reason) == choose_headline(
        len(noise.nll_within_noise),
        len(report.groups),
        noise.nll_pairs_resolved,
        noise.kl_pairs_resolved,
        noise.pairs,
    )
    assert noise.pairs == len(report.groups) * (len(report.groups) - 1) // 2
    for interval in (noise.spearman_nll, noise.kendall_nll, noise.spearman_kl, noise.kendall_kl):
        assert -1.0 <= interval.low <= interval.high <= 1.0


def int8_relative_error(weights: list[torch.Tensor]) -> float:
    """‖W - Q(W)‖ / ‖W‖ of INT8_DEFAULT_CFG's weights, by hand: symmetric 8 bits per output channel,
    scale from each row's max |w| (what ModelOpt's max calibration finds for a weight)."""
    import torch

    error = total = 0.0
    for w in weights:
        amax = w.abs().amax(dim=1, keepdim=True)
        q = torch.round(w / amax * 127.0) / 127.0 * amax
        error += float((q - w).double().square().sum())
        total += float(w.double().square().sum())
    return math.sqrt(error / total)


@pytest.mark.slow
def test_the_weight_error_proxy_is_the_int8_rounding_error_by_hand(int8_run: Run) -> None:
    report = int8_run.report
    proxies = {r.name: r for r in report.proxies}
    relative = proxies["‖W - Q(W)‖ / ‖W‖ (INT8_DEFAULT_CFG)"]
    assert relative.groups == len(report.groups)
    modules = {g.name: g.module_names for g in int8_run.inputs.get(SensitivityScores).groups}
    for validated, value in zip(report.groups, relative.values, strict=True):
        weights = [int8_run.pristine.get_submodule(m).weight.detach() for m in modules[validated.name]]
        assert value == pytest.approx(int8_relative_error(weights), rel=1e-4), validated.name
    for name in ("max |x| (input)", "max |x| / mean |x| (input)"):
        assert all(v > 0 for v in proxies[name].values), name
    assert all(-1.0 <= r.spearman_kl <= 1.0 for r in report.proxies if not math.isnan(r.spearman_kl))


@pytest.mark.slow
def test_refinement_reorders_the_measured_top_and_reuses_measurements(int8_run: Run) -> None:
    report = int8_run.report
    refined = report.refinement
    assert refined is not None
    candidates, _ = rank_candidates(int8_run.inputs.get(SensitivityScores).groups)
    assert (refined.n, refined.k) == (3, 2)
    assert sorted(g.name for g in refined.groups) == sorted(c.name for c in candidates)
    assert [g.refined_rank for g in refined.groups] == list(range(1, len(candidates) + 1))
    measured = [g for g in refined.groups if g.measured]
    top = [g for g in measured if g.measured == "top"]
    assert sorted(g.predicted_rank for g in top) == [1, 2, 3]
    assert len(measured) == 6
    assert refined.passes + refined.reused == 6
    assert refined.forward_batches > 0
    assert refined.seconds > 0
    for g in measured:
        assert g.kl_ci is not None
        assert g.kl_div >= 0.0
    validated = {g.name: g.kl_div for g in report.groups}
    assert all(g.kl_div == validated[g.name] for g in measured if g.name in validated)  # reused as measured
    block = len(top) + len(refined.promoted)
    assert refined.neighbours == block - 1
    assert 0 <= refined.neighbours_resolved <= refined.neighbours
    assert [g.kl_div for g in refined.groups[:block]] == sorted(
        (g.kl_div for g in refined.groups[:block]), reverse=True
    )
    assert [g.predicted_rank for g in refined.groups[block:]] == sorted(
        g.predicted_rank for g in refined.groups[block:]
    )


@pytest.mark.slow
def test_per_caption_sums_add_up_to_the_pass_totals(int8_run: Run) -> None:
    from auto_quantize_model.backend.measure import HeldOutEval

    report = int8_run.report
    held = held_out_set(
        ValidateSpec(holdout_captions=report.holdout_source, holdout_samples=report.holdout_samples),
        int8_run.inputs.get(CalibData),
        int8_run.inputs.get(LoadedModel).tokenizer,
    )
    evaluator = HeldOutEval.on(int8_run.inputs.get(LanguageModel), held.token_lists)
    first, kept = evaluator.run(keep=True)
    assert len(first.caption_nll) == len(first.caption_tokens) == len(held.token_lists)
    assert sorted(first.caption_tokens) == sorted(len(ids) - 1 for ids in held.token_lists)
    assert math.fsum(first.caption_nll) == pytest.approx(first.nll_sum, rel=1e-12)
    assert first.caption_kl == ()
    again, _ = evaluator.run(reference=kept)
    assert again.caption_kl == (0.0,) * len(held.token_lists)  # the same model: no divergence at all
    assert again.caption_nll == first.caption_nll


def one_at_a_time(decoder: Any, head: Any, prompt: tuple[int, ...], steps: int) -> tuple[int, ...]:
    """Greedy tokens after ``prompt``, one unpadded row per forward: no batching to get wrong."""
    import torch

    from auto_quantize_model.backend.lm_forward import decoder_hidden

    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.arange(len(ids))[None]}
            ids.append(int(head(decoder_hidden(decoder, batch)[0, -1:]).argmax(-1)))
    return tuple(ids[len(prompt) :])


@pytest.mark.slow
def test_the_chosen_mix_is_checked_where_it_generates(int8_run: Run) -> None:
    """Top-1 and greedy agreement of the chosen mix, redone one caption at a time by hand."""
    from auto_quantize_model.core.last_position import greedy_agreement

    figures = int8_run.report.last_position
    assert figures is not None
    spec = ValidateSpec()
    assert (figures.captions, figures.greedy_tokens, figures.greedy_captions) == (20, 8, spec.greedy_samples)
    held = held_out_set(
        ValidateSpec(holdout_captions=int8_run.report.holdout_source, holdout_samples=20),
        int8_run.inputs.get(CalibData),
        int8_run.inputs.get(LoadedModel).tokenizer,
    )
    lm = int8_run.inputs.get(LanguageModel)  # the model as AutoQuant chose it, put back after validation
    pristine = int8_run.pristine  # every group unquantized: the baseline
    chosen = [one_at_a_time(lm.module, lm.lm_head, p, 8) for p in held.token_lists]
    reference = [
        one_at_a_time(pristine.model.language_model, pristine.lm_head, p, 8) for p in held.token_lists
    ]
    same_first = sum(c[0] == r[0] for c, r in zip(chosen, reference, strict=True))
    assert figures.top1 == same_first / 20
    agreement, identical = greedy_agreement(tuple(chosen[:16]), tuple(reference[:16]), 8)
    assert (figures.greedy_agreement, figures.greedy_identical) == (agreement, identical)
    assert 0.0 <= figures.greedy_agreement <= 1.0
    assert math.isfinite(figures.kl)
    assert figures.kl >= 0.0
