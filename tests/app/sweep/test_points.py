"""Sweeps: expansion, up-front checks, folder names, failure bookkeeping, the index, reruns, and what
points share (one model load, verified copies, shared calibration, budgets re-solved from saved scores)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import attrs
import pytest

from auto_quantize_model.app import cli
from auto_quantize_model.app.folders import INDEX_NAME
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.app.runs import read_run
from auto_quantize_model.app.sweep.points import (
    PointOutcome,
    PointResult,
    SweepPoint,
    calib_key,
    expand_sweep,
    folder_name,
    model_key,
    point_label,
    render_index,
    reuse_order,
    run_sweep,
    search_key,
)
from auto_quantize_model.app.sweep.session import (
    GIB,
    PristineModel,
    SweepSession,
    choose_keep,
    copy_model,
    tensors_checksum,
    unique_tensors,
    weights_checksum,
)
from auto_quantize_model.artifacts import ReportPaths
from auto_quantize_model.errors import AqmError, ConfigError, InputError
from auto_quantize_model.io.manifest import manifest_to_json
from auto_quantize_model.io.pipeline_file import spec_from_dict
from auto_quantize_model.manifest_records import Manifest, ModelInfo
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.specs import PipelineSpec
from builders import INT8, descending, manifest


def make_spec(sweep: dict[str, list[object]] | None = None, **tables: object) -> PipelineSpec:
    raw: dict[str, object] = {"model": {"path": "builtin:tiny-qwen3-vl", "device": "cpu"}, **tables}
    if sweep is not None:
        raw["sweep"] = sweep
    return spec_from_dict(raw, source="s.toml")


def fake_manifest(names: list[str], bits: float) -> Manifest:
    model = ModelInfo(source="builtin:tiny-qwen3-vl", architecture="X", dtype="float32", device="cpu")
    return manifest(
        descending(names), fmt=INT8, score_samples=4, scheme="s", target=12.0, bits=bits, model=model
    )


def test_no_sweep_is_one_point_holding_the_spec() -> None:
    spec = make_spec()
    (point,) = expand_sweep(spec)
    assert point.spec is spec
    assert point.label == ""
    assert point.settings == ()


def test_cartesian_product_in_file_order() -> None:
    spec = make_spec(sweep={"autoquant.method": ["gradient", "kl_div"], "calib.seq_len": [32, 64]})
    points = expand_sweep(spec)
    assert [p.label for p in points] == [
        "autoquant.method=gradient,calib.seq_len=32",
        "autoquant.method=gradient,calib.seq_len=64",
        "autoquant.method=kl_div,calib.seq_len=32",
        "autoquant.method=kl_div,calib.seq_len=64",
    ]
    assert [(p.spec.autoquant.method, p.spec.calib.seq_len) for p in points] == [
        ("gradient", 32),
        ("gradient", 64),
        ("kl_div", 32),
        ("kl_div", 64),
    ]
    assert all(p.spec.sweep == {} for p in points)
    assert len({p.folder for p in points}) == 4


def test_sweep_over_a_list_setting_and_into_an_absent_table() -> None:
    spec = make_spec(
        sweep={
            "autoquant.formats": [["INT8_DEFAULT_CFG"], ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"]],
            "validate.k": [2],
        }
    )
    points = expand_sweep(spec)
    assert [p.spec.autoquant.formats for p in points] == [
        ("INT8_DEFAULT_CFG",),
        ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"),
    ]
    assert all(p.spec.validate is not None and p.spec.validate.k == 2 for p in points)
    assert points[1].label == "autoquant.formats=INT8_DEFAULT_CFG+FP8_DEFAULT_CFG,validate.k=2"


def test_every_point_is_checked_before_anything_runs() -> None:
    spec = make_spec(sweep={"calib.seq_len": [32, "64", 0], "autoquant.method": ["gradient", "fast"]})
    with pytest.raises(ConfigError) as info:
        expand_sweep(spec, source="s.toml")
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert (
        "s.toml: sweep point calib.seq_len=64,autoquant.method=gradient; "
        'calib.seq_len=64,autoquant.method=fast: calib.seq_len: expected int, got str "64"'
    ) in lines
    assert any(
        line.endswith(': autoquant.method: expected one of "gradient", "kl_div", got str "fast"')
        for line in lines
    )
    # a point with two problems reports both (the range check runs even when the method is wrong)
    assert (
        "s.toml: sweep point calib.seq_len=0,autoquant.method=gradient; "
        "calib.seq_len=0,autoquant.method=fast: calib.seq_len: must be > 0, got 0"
    ) in lines


def test_a_problem_of_every_point_is_reported_once(tmp_path: Path) -> None:
    spec = make_spec(sweep={"calib.seq_len": [32, 64]}, calib={"captions": str(tmp_path / "no.txt")})
    with pytest.raises(InputError) as info:
        expand_sweep(spec, source="s.toml")
    assert str(info.value) == f"s.toml: calib.captions: {tmp_path / 'no.txt'} does not exist"


def test_folder_names_are_safe_and_readable() -> None:
    assert folder_name([("autoquant.method", "kl_div"), ("calib.seq_len", 256)]) == (
        "autoquant.method=kl_div,calib.seq_len=256"
    )
    assert folder_name([("calib.captions", "/data/coco/captions small.txt")]) == (
        "calib.captions=captions_small.txt"
    )
    assert folder_name([("autoquant.effective_bits", 4.5)]) == "autoquant.effective_bits=4.5"
    long = folder_name([("autoquant.formats", ["wint4-b128_aint8-token"] * 10)])
    assert len(long) <= 96
    assert "/" not in long
    assert point_label([("reports.plots", False)]) == "reports.plots=false"


def test_colliding_folder_names_get_a_suffix(tmp_path: Path) -> None:
    files = [tmp_path / "a" / "x.txt", tmp_path / "b" / "x.txt"]
    for file in files:
        file.parent.mkdir()
        file.write_text("a caption\n", encoding="utf-8")
    spec = make_spec(sweep={"calib.captions": [str(f) for f in files]}, calib={"max_samples": 1})
    points = expand_sweep(spec)
    assert [p.folder for p in points] == ["calib.captions=x.txt", "calib.captions=x.txt-2"]
    assert [p.spec.calib.captions for p in points] == [str(f) for f in files]


def test_run_sweep_records_a_failure_and_goes_on(tmp_path: Path) -> None:
    spec = make_spec(sweep={"calib.seq_len": [16, 32, 64]})
    points = expand_sweep(spec)
    seen: list[str] = []

    def run_point(point: SweepPoint, folder: Path) -> Manifest | None:
        seen.append(folder.name)
        if point.spec.calib.seq_len == 32:
            raise InputError("captions file is empty | really")
        if point.spec.calib.seq_len == 64:
            raise RuntimeError("boom\nsecond line")
        # the index of the points before this one is already on disk
        return fake_manifest([f"layer{i}" for i in range(7)], 11.5)

    results = run_sweep(points, tmp_path, run_point, title="s.toml")
    assert seen == [p.folder for p in points]
    assert [r.status for r in results] == [
        "ok",
        "failed: captions file is empty | really",
        "failed: RuntimeError: boom",
    ]
    assert results[0].effective_bits == 11.5
    assert results[0].top_layers == ("layer0", "layer1", "layer2", "layer3", "layer4")
    index = (tmp_path / INDEX_NAME).read_text(encoding="utf-8")
    assert index.startswith("# Sweep: s.toml\n")
    assert "3 of 3 points run, 2 failed." in index
    rows = [line for line in index.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3
    assert "11.500" in rows[0]
    assert "`layer4`" in rows[0]
    assert "`layer5`" not in rows[0]
    assert "failed: captions file is empty \\| really" in rows[1]
    assert rows[0].count("|") - rows[0].count("\\|") == 8


def test_run_sweep_lets_ctrl_c_through(tmp_path: Path) -> None:
    points = expand_sweep(make_spec(sweep={"calib.seq_len": [16, 32]}))

    def run_point(point: SweepPoint, folder: Path) -> Manifest | None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(points, tmp_path, run_point)


def test_render_index_of_a_partial_sweep() -> None:
    points = expand_sweep(make_spec(sweep={"calib.seq_len": [16, 32]}))
    text = render_index([PointResult(points[0], "ok", 1.25)], total=2)
    assert "1 of 2 points run, 0 failed." in text
    assert "[calib.seq_len=16](calib.seq_len=16/)" in text
    assert "`calib.seq_len = 16`" in text
    assert "1.2 s" in text or "1.3 s" in text


TINY_SWEEP = """
[model]
path = "builtin:tiny-qwen3-vl"
device = "cpu"
[calib]
max_samples = 16
seq_len = 32
batch_size = 4
[autoquant]
formats = ["INT8_DEFAULT_CFG"]
effective_bits = 12.0
score_size = 8
[manifest]
scheme = "tiny"
[reports]
plots = false
[sweep]
"""
"""The tiny model on CPU, small calibration, no plots; a ``[sweep]`` table follows."""


@pytest.mark.slow
def test_two_point_sweep_on_the_tiny_model(tmp_path: Path) -> None:
    """The real run service end to end, in this process: a fresh interpreter would only add library
    imports, which ``aqm run``'s own tests time."""
    pipeline = tmp_path / "sweep.toml"
    pipeline.write_text(
        TINY_SWEEP
        + """"autoquant.method" = ["gradient", "kl_div"]
""",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    assert cli.main(["run", str(pipeline), "--output", str(out)]) == 0
    index = (out / INDEX_NAME).read_text(encoding="utf-8")
    assert "2 of 2 points run, 0 failed." in index
    for method in ("gradient", "kl_div"):
        folder = out / f"autoquant.method={method}"
        assert (folder / "tiny_quant_manifest.json").is_file()
        assert (folder / "per-layer-sensitivity.md").is_file()
        assert f'method = "{method}"' in (folder / "pipeline.toml").read_text(encoding="utf-8")
    assert "[sweep]" in (out / "pipeline.toml").read_text(encoding="utf-8")
    rows = [line for line in index.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2
    assert rows[0].rstrip().endswith("| ok |")
    # the second method ran on a copy of the first point's model and on its calibration batches
    assert rows[1].rstrip().endswith("| ok; model copy; calibration of autoquant.method=gradient |")
    assert all("model.language_model.layers." in row for row in rows)


# --------------------------------------------------------------------------------------------------
# What points share: keys and order (pure)
# --------------------------------------------------------------------------------------------------


def test_search_key_ignores_only_the_budget_and_the_checkpoint() -> None:
    base = make_spec()
    budget = make_spec(autoquant={"effective_bits": 10.0, "checkpoint": "/x/state.pt"})
    assert search_key(base) == search_key(budget)
    assert calib_key(base) == calib_key(budget)
    for other in (
        make_spec(autoquant={"method": "kl_div"}),
        make_spec(autoquant={"formats": ["FP8_DEFAULT_CFG"]}),
        make_spec(calib={"seq_len": 32}),
        make_spec(extract={"scope": "full_model"}),
        make_spec(model={"path": "builtin:tiny-qwen3-vl", "device": "cpu", "seed": 1}),
    ):
        assert search_key(other) != search_key(base)
    assert model_key(make_spec(calib={"seq_len": 32})) == model_key(base)
    assert calib_key(make_spec(calib={"seq_len": 32})) != calib_key(base)


def test_reuse_order_runs_what_points_share_back_to_back() -> None:
    sweep: dict[str, list[object]] = {
        "autoquant.effective_bits": [12.0, 10.0],
        "model.seed": [0, 1],
        "calib.seq_len": [32, 64],
    }
    points = expand_sweep(make_spec(sweep=sweep))
    ordered = reuse_order(points)
    assert sorted(p.label for p in ordered) == sorted(p.label for p in points)
    settings = [(p.spec.model.seed, p.spec.calib.seq_len, p.spec.autoquant.effective_bits) for p in ordered]
    assert settings == [
        (0, 32, 12.0),
        (0, 32, 10.0),
        (0, 64, 12.0),
        (0, 64, 10.0),
        (1, 32, 12.0),
        (1, 32, 10.0),
        (1, 64, 12.0),
        (1, 64, 10.0),
    ]
    already = expand_sweep(make_spec(sweep={"calib.seq_len": [32, 64]}))
    assert reuse_order(already) == already


def test_run_sweep_takes_outcomes_and_writes_notes(tmp_path: Path) -> None:
    points = expand_sweep(make_spec(sweep={"calib.seq_len": [16, 32, 64]}))
    outcomes = {
        16: PointOutcome(fake_manifest(["a", "b"], 11.0), earlier=True, seconds=42.0),
        32: PointOutcome(fake_manifest(["b", "a"], 10.0), reuse="model copy; calibration of x"),
    }

    def run_point(point: SweepPoint, folder: Path) -> PointOutcome | None:
        return outcomes.get(point.spec.calib.seq_len)

    results = run_sweep(points, tmp_path, run_point, notes=lambda: ["Shared: one model."])
    assert [(r.ok, r.earlier, r.reuse) for r in results] == [
        (True, True, ""),
        (True, False, "model copy; calibration of x"),
        (True, False, ""),
    ]
    assert results[0].seconds == 42.0
    assert results[0].top_layers == ("a", "b")
    index = (tmp_path / INDEX_NAME).read_text(encoding="utf-8")
    assert "3 of 3 points run, 0 failed, 1 finished by an earlier run." in index
    assert "\n\nShared: one model.\n" in index
    rows = [line for line in index.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows[0].endswith("| 42.0 s | ok (an earlier run) |")
    assert rows[1].endswith("| ok; model copy; calibration of x |")
    assert rows[2].endswith("| ok |")


# --------------------------------------------------------------------------------------------------
# Where the pristine model lives, copies and their checksum
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "cuda", "device_free", "host_free", "spread", "keep"),
    [
        (9 * GIB, True, 130 * GIB, 120 * GIB, False, "device"),  # 4B bf16 on an H200
        (17 * GIB, True, 122 * GIB, 110 * GIB, False, "device"),  # 8B
        (64 * GIB, True, 75 * GIB, 120 * GIB, False, "host"),  # 32B: no room for two copies
        (64 * GIB, True, 75 * GIB, 60 * GIB, False, "reload"),  # nor in host memory
        (9 * GIB, True, 130 * GIB, 120 * GIB, True, "reload"),  # spread over devices
        (GIB // 1000, False, None, 10 * GIB, False, "device"),  # a tiny model on CPU
        (6 * GIB, False, None, 10 * GIB, False, "reload"),  # a copy would crowd the run out
    ],
)
def test_choose_keep(
    weights: int, cuda: bool, device_free: int | None, host_free: int, spread: bool, keep: str
) -> None:
    assert (
        choose_keep(weights, cuda=cuda, device_free=device_free, host_free=host_free, spread=spread) == keep
    )


def _tied_model() -> Any:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11, bias=False))
    model[1].weight = model[0].weight  # tied, as embeddings and lm_head often are
    model.register_buffer("scale", torch.arange(4, dtype=torch.float32), persistent=False)
    return model


def test_copies_match_the_checksum_and_keep_weights_tied() -> None:
    import torch

    model = _tied_model()
    copied: Any = copy_model(model, torch.device("cpu"))
    assert weights_checksum(copied) == weights_checksum(model)
    assert copied[1].weight is copied[0].weight
    assert copied[0].weight.data_ptr() != model[0].weight.data_ptr()
    assert [name for name, _ in unique_tensors(copied)] == ["0.weight", "scale"]
    with torch.no_grad():
        copied[0].weight[3, 2] += 1.0
    assert weights_checksum(copied) != weights_checksum(model)
    assert torch.equal(model[0].weight, _tied_model()[0].weight), "the original is untouched"


def test_checksum_sees_one_changed_byte_and_moved_values() -> None:
    import torch

    base = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    reference = tensors_checksum([("w", base)])
    flipped = base.clone()
    flipped.view(-1).view(torch.uint8)[17] ^= 1
    swapped = base.clone()
    swapped[0, 0], swapped[0, 1] = base[0, 1].item(), base[0, 0].item()
    for other in (flipped, swapped, base.to(torch.float64), base.reshape(4, 16)):
        assert tensors_checksum([("w", other)]) != reference
    assert tensors_checksum([("v", base)]) != reference
    assert tensors_checksum([("w", base.clone())]) == reference


def test_a_pristine_model_that_changed_is_refused() -> None:
    import torch

    from auto_quantize_model.artifacts import LoadedModel

    model = _tied_model()
    loaded = LoadedModel(model, None, "test", "Sequential", "float32", "cpu")  # type: ignore[arg-type]
    pristine = PristineModel.keep_loaded(loaded, make_spec().model)
    assert pristine.keep == "device"
    first = pristine.fresh()
    assert first.model is not model
    copied: Any = first.model
    assert weights_checksum(first.model) == pristine.checksum
    with torch.no_grad():
        copied[0].weight.zero_()  # a point quantizing its copy in place
    assert weights_checksum(pristine.fresh().model) == pristine.checksum
    with torch.no_grad():
        model[0].weight[0, 0] = 7.0  # something changed the kept model itself
    with pytest.raises(AqmError, match="differs from the model as loaded"):
        pristine.fresh()


# --------------------------------------------------------------------------------------------------
# Reruns of a sweep folder (a fake pipeline runner: no model)
# --------------------------------------------------------------------------------------------------


@attrs.define
class FakePoints:
    """Writes what a point's run writes (search state, manifest, reports); interrupts where told."""

    interrupt_at: str | None = None
    calls: list[str] = attrs.field(factory=list)

    def __call__(self, spec: PipelineSpec, folder: Path) -> Artifacts:
        self.calls.append(folder.name)
        assert spec.autoquant.checkpoint is not None
        Path(spec.autoquant.checkpoint).write_text("state", "utf-8")
        if folder.name == self.interrupt_at:
            raise KeyboardInterrupt
        ranked = fake_manifest(["a", "b"], 11.0)
        files = [folder / "s_quant_manifest.json", folder / "per-layer-sensitivity.md"]
        files[0].write_text(manifest_to_json(ranked), "utf-8")
        files[1].write_text("report", "utf-8")
        return Artifacts.of([ranked, ReportPaths(str(folder), tuple(map(str, files)))])


SWEEP_FILE = """
[model]
path = "builtin:tiny-qwen3-vl"
device = "cpu"
[manifest]
scheme = "s"
[sweep]
"calib.seq_len" = [16, 32, 64]
"""


def _run_sweep_file(tmp_path: Path, runner: FakePoints, *extra: str) -> int:
    toml = tmp_path / "sweep.toml"
    toml.write_text(SWEEP_FILE, "utf-8")
    service = RunService(pipeline_runner=runner, library_importer=lambda: 0.0)
    return cli.main(["run", str(toml), "--output", str(tmp_path / "out"), *extra], service=service)


def test_a_rerun_skips_finished_points_and_resumes_the_interrupted_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = FakePoints(interrupt_at="calib.seq_len=32")
    assert _run_sweep_file(tmp_path, first) == 130  # Ctrl-C
    assert first.calls == ["calib.seq_len=16", "calib.seq_len=32"]
    assert (read_run(out) or pytest.fail("no run.json")).status.startswith("failed")
    interrupted = read_run(out / "calib.seq_len=32")
    assert interrupted is not None
    assert interrupted.status == "failed: interrupted (Ctrl-C)"
    assert (out / "calib.seq_len=32" / "autoquant_search_state.pt").is_file(), "the resume kit stays"

    again = FakePoints()
    assert _run_sweep_file(tmp_path, again) == 0
    assert again.calls == ["calib.seq_len=32", "calib.seq_len=64"]
    resumed = read_run(out / "calib.seq_len=32")
    assert resumed is not None
    assert (resumed.status, resumed.resumed) == ("complete", True)
    record = read_run(out)
    assert record is not None
    assert (record.status, record.resumed, record.sweep) == ("complete", True, True)
    index = (out / INDEX_NAME).read_text("utf-8")
    assert "3 of 3 points run, 0 failed, 1 finished by an earlier run." in index
    assert "| ok; resumed |" in index

    finished = FakePoints()
    assert _run_sweep_file(tmp_path, finished) == 0
    assert finished.calls == []


def test_a_finished_point_with_other_settings_is_not_taken(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run_sweep_file(tmp_path, FakePoints()) == 0
    toml = out / "calib.seq_len=64" / "pipeline.toml"
    toml.write_text(toml.read_text("utf-8").replace("seq_len = 64", "seq_len = 65"), "utf-8")
    runner = FakePoints()
    assert _run_sweep_file(tmp_path, runner) == 1  # that point fails, naming the folder's run
    assert runner.calls == []
    assert "already holds a run (complete); pass --force" in (out / INDEX_NAME).read_text("utf-8")


def test_a_rerun_with_other_settings_is_refused_and_force_starts_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run_sweep_file(tmp_path, FakePoints()) == 0
    changed = FakePoints()
    assert _run_sweep_file(tmp_path, changed, "--set", "calib.batch_size=2") == 2
    assert "holds a sweep with other settings (calib.batch_size: 8 -> 2)" in capsys.readouterr().err
    assert changed.calls == []
    forced = FakePoints()
    assert _run_sweep_file(tmp_path, forced, "--set", "calib.batch_size=2", "--force") == 0
    assert len(forced.calls) == 3


def test_aqm_resume_continues_a_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _run_sweep_file(tmp_path, FakePoints(interrupt_at="calib.seq_len=16")) == 130
    runner = FakePoints()
    service = RunService(pipeline_runner=runner, library_importer=lambda: 0.0)
    assert cli.main(["resume", str(out)], service=service) == 0
    assert runner.calls == ["calib.seq_len=16", "calib.seq_len=32", "calib.seq_len=64"]
    assert cli.main(["resume", str(out)], service=service) == 2
    assert "already complete; nothing to resume" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The tiny model, for real: one load, verified copies, shared batches, re-solved budgets
# --------------------------------------------------------------------------------------------------

REUSE_SWEEP = (
    TINY_SWEEP
    + """"autoquant.effective_bits" = [12.0, 10.0]
"calib.max_samples" = [16, 24]
"""
)


@attrs.define
class CountingLoader:
    """The real loader, counted; keeps a bit-exact snapshot of every model it returned."""

    loaded: list[Any] = attrs.field(factory=list)
    snapshots: list[dict[str, Any]] = attrs.field(factory=list)

    def __call__(self, spec: Any) -> Any:
        from auto_quantize_model.backend.models import load

        loaded = load(spec)
        self.loaded.append(loaded)
        self.snapshots.append({name: t.detach().clone() for name, t in unique_tensors(loaded.model)})
        return loaded


@pytest.mark.slow
def test_a_four_point_sweep_loads_once_and_restores_the_weights(tmp_path: Path) -> None:
    import torch

    toml = tmp_path / "sweep.toml"
    toml.write_text(REUSE_SWEEP, "utf-8")
    out = tmp_path / "out"
    loader = CountingLoader()
    session = SweepSession(loader=loader)
    service = RunService(library_importer=lambda: 0.0, sweep_session=lambda: session)
    assert cli.main(["run", str(toml), "--output", str(out)], service=service) == 0

    assert len(loader.loaded) == session.loads == 1
    (loaded,) = loader.loaded
    (snapshot,) = loader.snapshots
    # the model as loaded never ran: its weights are bit for bit what the loader returned ...
    for name, tensor in unique_tensors(loaded.model):
        assert torch.equal(tensor.view(torch.uint8), snapshot[name].view(torch.uint8)), name
    # ... and every point ran on a copy whose checksum matched it
    assert session.checksums == [tensors_checksum(snapshot.items())] * 4
    assert (session.calib_builds, session.calib_reuses, session.search_reuses) == (2, 2, 2)

    points = {
        (bits, samples): out / f"autoquant.effective_bits={bits},calib.max_samples={samples}"
        for bits in (12.0, 10.0)
        for samples in (16, 24)
    }
    manifests = {key: _read_manifest(folder) for key, folder in points.items()}
    for samples in (16, 24):
        scored, resolved = manifests[12.0, samples], manifests[10.0, samples]
        # the budget-only point re-solved the saved scores: no forward pass, the very same scores
        steps = (read_run(points[10.0, samples]) or pytest.fail("no run.json")).forward_steps
        assert steps is not None
        assert (steps.calibration, steps.scoring) == (0, 0)
        assert {g.name: g.scores for g in resolved.groups} == {g.name: g.scores for g in scored.groups}
        assert (resolved.scheme.effective_bits_lm or 16.0) <= 10.0 < (scored.scheme.effective_bits_lm or 0.0)
    index = (out / INDEX_NAME).read_text("utf-8")
    assert "model loaded 1 time(s), 4 verified copies; calibration built 2 time(s), reused 2" in index

    again = SweepSession(loader=loader)
    service = RunService(library_importer=lambda: 0.0, sweep_session=lambda: again)
    assert cli.main(["run", str(toml), "--output", str(out)], service=service) == 0
    assert (again.loads, len(loader.loaded)) == (0, 1), "a finished sweep reruns without loading anything"


def _read_manifest(folder: Path) -> Manifest:
    from auto_quantize_model.io.manifest_file import read_manifest

    (path,) = folder.glob("*_quant_manifest.json")
    return read_manifest(path)


# --------------------------------------------------------------------------------------------------
# The previous tool's matrix as a pipeline file
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
def test_a_sweep_on_cuda_keeps_copies_on_the_device_and_lets_them_go(tmp_path: Path) -> None:
    """The GPU path of the session: the kept model and each copy on the GPU, nothing left after the sweep."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    toml = tmp_path / "sweep.toml"
    toml.write_text(REUSE_SWEEP.replace('device = "cpu"', 'device = "cuda"'), "utf-8")
    loader = CountingLoader()
    session = SweepSession(loader=loader)
    service = RunService(library_importer=lambda: 0.0, sweep_session=lambda: session)
    before = torch.cuda.memory_allocated()
    assert cli.main(["run", str(toml), "--output", str(tmp_path / "out")], service=service) == 0
    assert session.loads == 1
    assert len(set(session.checksums)) == 1
    assert len(session.checksums) == 4
    (loaded,) = loader.loaded
    assert {t.device.type for _, t in unique_tensors(loaded.model)} == {"cuda"}, "kept on the device"
    loader.loaded.clear()
    loader.snapshots.clear()
    del loaded
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() <= before + 2**20, "no model copy outlives the sweep"
