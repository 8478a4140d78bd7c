"""Degenerate settings, a full disk, a tampered raw-score record, a cgroup memory limit (issue 21).

* settings that leave nothing to score or measure are refused by ``aqm validate`` and by ``aqm
  run`` before the pipeline starts (a tripwire stands in for it), in one line naming the key;
* a search-state save that runs out of room (a full disk, a file-size limit) is one line naming
  the file, and the previous state stays whole (ModelOpt itself runs here: slow);
* a raw-score record whose numbers changed after aqm wrote it is never used, a NaN typed into
  it included, and one that agrees with its state still is;
* the padded layout's memory check counts the room left under the process's cgroup limits,
  read from a fake ``/proc`` and ``/sys/fs/cgroup`` tree.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import auto_quantize_model
from auto_quantize_model.app import cli
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.backend.modelopt.checkpoint import (
    CORRUPT_SUFFIX,
    SearchCheckpoint,
    StateFiles,
    raw_scores_sha256,
)
from auto_quantize_model.core.batching import MemoryBudget, calib_columns, check_padded_memory
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.io.memory_limits import HostMemory, available_memory, cgroup_headroom
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.spec_values import SpecError
from auto_quantize_model.specs import CalibSpec, PipelineSpec, ValidateSpec
from auto_quantize_model.stages.build_calib_loader import memory_budget
from fakes import FakeTokenizer, fake_loaded

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "pipelines" / "tiny-qwen3-vl.toml"
SRC = Path(auto_quantize_model.__file__).resolve().parents[1]
LOGGER = "auto_quantize_model"
GIB = 2**30

# --------------------------------------------------------------------------------------------------
# Degenerate settings: refused before the model loads
# --------------------------------------------------------------------------------------------------


def _tripwire(spec: PipelineSpec, folder: Path) -> Artifacts:
    raise AssertionError("the pipeline started: the settings were not refused before loading")


TRIPPED = RunService(pipeline_runner=_tripwire, library_importer=lambda: 0.0)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("aqm: error:")]


def _holdout_copy(tmp: Path) -> str:
    """The bundled held-out captions as a file of the user's (so calibration can read them too)."""
    from auto_quantize_model.data import builtin_holdout_path

    copy = tmp / "held.txt"
    copy.write_bytes(builtin_holdout_path().read_bytes())
    return str(copy)


DEGENERATE: dict[str, tuple[list[str], str]] = {
    "one-token rows": (
        ["calib.seq_len=1"],
        "calib.seq_len: must be at least 2, got 1: a row of 1 token has no next token to predict",
    ),
    "one bootstrap resample": (
        ["validate.bootstrap=1"],
        "validate.bootstrap: must be 0 (no intervals) or at least 40, got 1",
    ),
    "held-out text all used for calibration": (
        ["calib.max_samples=512", "validate.holdout_captions='builtin'"],
        "validate.holdout_captions: no held-out captions left: all 512 of builtin are among the 512 "
        'calibration captions (calib.captions = "builtin"); point validate.holdout_captions at other text',
    ),
    "measured frontier on calibration text": (
        [
            "calib.captions='{held}'",
            "calib.max_samples=128",
            "frontier.bits='8:12:1'",
            "frontier.measure=2",
            "frontier.holdout_captions='{held}'",
        ],
        "frontier.holdout_captions: no held-out captions left: all 128 of {held} are among the 128",
    ),
    "exported checkpoint read back on calibration text": (
        ["calib.captions='{held}'", "calib.max_samples=128", "export.checkpoint=true"],
        "export.checkpoint: no held-out captions left: all 128 of builtin-holdout are among the 128 "
        "calibration captions",
    ),
}


@pytest.mark.parametrize(("settings", "needle"), list(DEGENERATE.values()), ids=list(DEGENERATE))
def test_degenerate_settings_are_one_line_from_validate_and_run_before_loading(
    settings: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    held = _holdout_copy(tmp_path)
    args = [arg for s in settings for arg in ("--set", s.format(held=held))]
    out = tmp_path / "X"

    validate_code = cli.main(["validate", str(TINY), *args])
    validate_err = capsys.readouterr().err
    run_code = cli.main(["run", str(TINY), *args, "--output", str(out)], service=TRIPPED)
    run_err = capsys.readouterr().err

    assert (validate_code, run_code) == (2, 2), run_err
    lines = _error_lines(run_err)
    assert lines == _error_lines(validate_err)
    assert any(needle.format(held=held) in line for line in lines), run_err
    assert "Traceback" not in run_err
    assert not out.exists()


def test_seq_len_1_through_the_cli_is_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's own case: exit 0, every score 0 and an all-quantized mix, before the fix."""
    out = tmp_path / "X"
    code = cli.main(["run", str(TINY), "--set", "calib.seq_len=1", "--output", str(out)], service=TRIPPED)
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"aqm: error: {TINY}: calib.seq_len: must be at least 2, got 1: a row of 1 token has no next "
        "token to predict, so every score would be 0 and every group quantized (from --set calib.seq_len=1)"
    ]
    assert not out.exists()


def test_the_python_api_refuses_the_same_values() -> None:
    with pytest.raises(SpecError, match=r"^CalibSpec\.seq_len: must be at least 2, got 1"):
        CalibSpec(seq_len=1)
    with pytest.raises(
        SpecError, match=r"^ValidateSpec\.bootstrap: must be 0 \(no intervals\) or at least 40"
    ):
        ValidateSpec(bootstrap=39)
    assert CalibSpec(seq_len=2).seq_len == 2
    assert (ValidateSpec(bootstrap=0).bootstrap, ValidateSpec(bootstrap=40).bootstrap) == (0, 40)


def test_captions_that_are_all_one_token_long_are_refused_before_the_search() -> None:
    """Not knowable before the tokenizer runs; refused as soon as it has, not after a search of zeros."""
    with pytest.raises(ConfigError) as caught:
        calib_columns(
            [[11], [12], [13]],
            CalibSpec(seq_len=8),
            pad_id=0,
            captions_path="c.txt",
            captions_sha256="0" * 64,
        )
    assert str(caught.value) == (
        "calib.captions: all 3 calibration captions (c.txt) are 1 token long, so no token has a next one "
        "to predict and every score would be 0; use longer captions"
    )
    built = calib_columns(
        [[11], [12, 13]], CalibSpec(seq_len=8), pad_id=0, captions_path="c", captions_sha256=""
    )
    assert built.stats.samples == 2  # one caption with a target is enough


# --------------------------------------------------------------------------------------------------
# A full disk or a file-size limit while the search state is saved (real ModelOpt: slow)
# --------------------------------------------------------------------------------------------------

TOY_SEARCHER = """
from modelopt.torch.opt.searcher import BaseSearcher

class Toy(BaseSearcher):
    @property
    def default_state_dict(self):
        return {"value": 0}

    def run_search(self):
        pass

def toy(path):
    searcher = Toy()
    searcher.config = {"checkpoint": str(path), "verbose": False}
    searcher.reset_search()
    return searcher
"""


@pytest.fixture(scope="module")
def toy_module() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        namespace: dict[str, Any] = {}
        exec(TOY_SEARCHER, namespace)  # the same source the file-size test's subprocess runs
    return SimpleNamespace(**namespace)


class _FullDisk(io.FileIO):
    """A file that takes ``room`` bytes and then fails as a full disk does (ENOSPC)."""

    def __init__(self, path: Path, room: int) -> None:
        super().__init__(path, "w")
        self.room = room

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        written = super().write(data)
        assert written is not None
        return written


@pytest.mark.slow
def test_a_full_disk_during_the_state_save_is_one_line_and_the_previous_state_stays(
    toy_module: Any, tmp_path: Path
) -> None:
    from auto_quantize_model.backend.modelopt.patches import StateNotSaved, atomic_state_save

    state = tmp_path / "autoquant_search_state.pt"
    searcher = toy_module.toy(state)
    with atomic_state_save(lambda s, real, temporary: None):
        searcher.value = 1
        searcher.save_search_checkpoint()
    before = state.read_bytes()

    room = len(before) // 2
    searcher.value = bytes(4 * len(before))
    with (
        atomic_state_save(lambda s, real, temporary: None, open_file=lambda p: _FullDisk(p, room)),
        pytest.raises(StateNotSaved) as caught,
    ):
        searcher.save_search_checkpoint()
    assert str(caught.value) == (
        f"cannot save the search state {state}: the disk is full (No space left on device); the file "
        "still holds the previous state, so a rerun resumes from it once there is room (nothing "
        "half-written is left)"
    )
    assert state.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [state.name]
    fresh = toy_module.toy(state)
    assert fresh.load_search_checkpoint() is True
    assert fresh.value == 1


EFBIG_SCRIPT = """
import json, resource, signal, sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
{toy}
from auto_quantize_model.backend.modelopt.patches import atomic_state_save
from auto_quantize_model.errors import AqmError

state = Path(sys.argv[1])
searcher = toy(state)
with atomic_state_save(lambda s, real, temporary: None):
    searcher.value = 1
    searcher.save_search_checkpoint()
    before = state.read_bytes()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # what python does anyway: writes fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 * len(before), resource.RLIM_INFINITY))
    searcher.value = bytes(40 * len(before))
    try:
        searcher.save_search_checkpoint()
        outcome = "saved"
    except AqmError as err:
        outcome = str(err)
    except Exception as err:
        outcome = f"{{type(err).__name__}}: {{err}}"
print(json.dumps({{
    "outcome": outcome,
    "intact": state.read_bytes() == before,
    "files": sorted(p.name for p in state.parent.iterdir()),
}}))
"""


@pytest.mark.slow
def test_a_file_size_limit_during_the_state_save_is_one_line_and_the_previous_state_stays(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", EFBIG_SCRIPT.format(toy=TOY_SEARCHER), str(state)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {
        "outcome": (
            f"cannot save the search state {state}: the file-size limit stops it (ulimit -f, or the file "
            "system's largest file) (File too large); the file still holds the previous state, so a rerun "
            "resumes from it once there is room (nothing half-written is left)"
        ),
        "intact": True,
        "files": ["state.pt"],
    }


def test_a_first_save_that_finds_no_room_says_there_is_nothing_to_resume(tmp_path: Path) -> None:
    """torch reports the OS error only as the context of its own RuntimeError: that is found too."""
    from auto_quantize_model.backend.modelopt.patches import state_not_saved

    def torch_like(code: int) -> RuntimeError:
        try:
            try:
                raise OSError(code, os.strerror(code))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
        except RuntimeError as err:
            return err

    state = tmp_path / "state.pt"
    error = state_not_saved(state, torch_like(errno.EDQUOT), had_state=False)
    assert error is not None
    assert str(error) == (
        f"cannot save the search state {state}: the disk quota is used up (Disk quota exceeded); no "
        "earlier state was saved, so a rerun starts the search again once there is room (nothing "
        "half-written is left)"
    )
    assert state_not_saved(state, torch_like(errno.EACCES), had_state=True) is None  # not a matter of room


# --------------------------------------------------------------------------------------------------
# A raw-score record changed after aqm wrote it
# --------------------------------------------------------------------------------------------------

INT8, FP8, NONE = "INT8(effective-bits: 8.0)", "FP8(effective-bits: 8.0)", "NONE(effective-bits: 16.0)"
KEY = "decoder.layers.0.mlp.up_proj.quant_recipe"
RAW = {KEY: {INT8: 2.5, FP8: 3.0, NONE: 0.0}}
"""FP8 scores above INT8, listed after it at the same bits: ModelOpt's state clamps it to 2.5."""
SETTINGS = {"formats": ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"], "model_weights_sha256": "c" * 64}


def _searcher(scores: tuple[float, ...] = (2.5, 2.5, 0.0)) -> Any:
    stats = {KEY: {"formats": [INT8, FP8, NONE], "scores": list(scores)}}
    return SimpleNamespace(quantizer_states={0: None, 1: None}, candidate_stats=stats)


@pytest.fixture
def unit(tmp_path: Path) -> StateFiles:
    """A finished search's three files, as aqm writes them."""
    files = StateFiles(tmp_path / "state.pt")
    files.state.write_bytes(b"modelopt search state")
    files.write_settings(SETTINGS)
    files.write_raw_scores(RAW, files.state)
    return files


def _resume(files: StateFiles, searcher: Any, caplog: pytest.LogCaptureFixture) -> tuple[Any, list[str]]:
    checkpoint = SearchCheckpoint.open(str(files.state), lambda: SETTINGS)
    with caplog.at_level("INFO", LOGGER):
        checkpoint.loaded(searcher, True)
    warnings_seen = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    return checkpoint, warnings_seen


def _edit(files: StateFiles, value: float, *, fix_checksum: bool = False) -> None:
    record = json.loads(files.raw_scores.read_text(encoding="utf-8"))
    record["raw_scores"][KEY][FP8] = value
    if fix_checksum:
        record["raw_scores_sha256"] = raw_scores_sha256(record["raw_scores"])
    files.raw_scores.write_text(json.dumps(record), encoding="utf-8")  # NaN is written as NaN


@pytest.mark.parametrize("value", [30.0, math.nan], ids=["edited", "NaN"])
def test_a_record_edited_after_it_was_written_is_moved_aside_and_the_scores_recomputed(
    unit: StateFiles, caplog: pytest.LogCaptureFixture, value: float
) -> None:
    untouched, none = _resume(unit, _searcher(), caplog)
    assert (untouched.raw, none) == (RAW, [])  # control: the record as written is reused
    caplog.clear()
    _edit(unit, value)
    searcher = _searcher()
    checkpoint, seen = _resume(unit, searcher, caplog)
    assert checkpoint.raw is None
    assert not searcher.candidate_stats  # ModelOpt scores again; calibration stays restored
    assert seen == [
        f"AutoQuant: the raw-score record {unit.raw_scores} is not usable with {unit.state}: its scores do "
        "not match their checksum (raw_scores_sha256); it was changed after aqm wrote it, so none of its "
        "numbers are used (moved aside as state.pt.raw-scores.json.corrupt); the scores are recomputed "
        "(calibration of 2 formats is reused)"
    ]
    assert "overflow" not in seen[0]  # a NaN from the file is the file's, not the computation's
    assert unit.raw_scores.with_name(unit.raw_scores.name + CORRUPT_SUFFIX).is_file()
    assert not unit.raw_scores.exists()


def test_a_record_with_a_recomputed_checksum_must_still_agree_with_the_state(
    unit: StateFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """INT8 set to NaN: ModelOpt's clamp would have stored NaN, the state holds 2.5.

    The control: a NaN the search itself recorded (the state holds ModelOpt's clamp of it) is kept,
    and left to the non-finite check, which rightly blames the computation.
    """
    computed = {KEY: {INT8: math.nan, FP8: 3.0, NONE: 0.0}}
    unit.write_raw_scores(computed, unit.state)
    # min(nan, inf) is nan, then min(3.0, nan) is 3.0: what ModelOpt's clamp stores
    kept, none = _resume(unit, _searcher((math.nan, 3.0, 0.0)), caplog)
    assert none == []
    assert kept.raw is not None
    assert math.isnan(kept.raw[KEY][INT8])
    caplog.clear()

    unit.write_raw_scores(RAW, unit.state)
    record = json.loads(unit.raw_scores.read_text(encoding="utf-8"))
    record["raw_scores"][KEY][INT8] = math.nan
    record["raw_scores_sha256"] = raw_scores_sha256(record["raw_scores"])
    unit.raw_scores.write_text(json.dumps(record), encoding="utf-8")
    checkpoint, seen = _resume(unit, _searcher(), caplog)
    assert checkpoint.raw is None
    assert len(seen) == 1
    assert f"its score of {KEY} {INT8} disagrees with the clamped one saved in the state" in seen[0]


def test_a_record_without_a_checksum_is_not_trusted(
    unit: StateFiles, caplog: pytest.LogCaptureFixture
) -> None:
    record = json.loads(unit.raw_scores.read_text(encoding="utf-8"))
    del record["raw_scores_sha256"]
    unit.raw_scores.write_text(json.dumps(record), encoding="utf-8")
    checkpoint, seen = _resume(unit, _searcher(), caplog)
    assert checkpoint.raw is None
    assert len(seen) == 1
    assert "it has no checksum of its scores (written by an older aqm); the scores are recomputed" in seen[0]
    assert unit.raw_scores.exists()  # not evidence of a change: left to be replaced by the next save


# --------------------------------------------------------------------------------------------------
# The padded layout's memory check and the cgroup limit
# --------------------------------------------------------------------------------------------------


def _tree(tmp: Path, cgroup: str, files: dict[str, str], meminfo_kib: int = 64 * 2**20) -> dict[str, Path]:
    """A fake ``/proc/meminfo``, ``/proc/self/cgroup`` and ``/sys/fs/cgroup`` under ``tmp``."""
    proc, root = tmp / "proc", tmp / "sys" / "fs" / "cgroup"
    proc.mkdir(parents=True)
    root.mkdir(parents=True)
    (proc / "meminfo").write_text(
        f"MemTotal:       {2 * meminfo_kib} kB\nMemFree:         1000 kB\nMemAvailable:   {meminfo_kib} kB\n",
        encoding="ascii",
    )
    (proc / "cgroup").write_text(cgroup, encoding="ascii")
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="ascii")
    return {"meminfo": proc / "meminfo", "proc_cgroup": proc / "cgroup", "root": root}


def test_cgroup_v2_room_is_the_least_left_under_the_group_and_its_parents(tmp_path: Path) -> None:
    paths = _tree(
        tmp_path,
        "0::/jobs.slice/job-7\n",
        {
            "jobs.slice/job-7/memory.max": f"{4 * GIB}\n",
            "jobs.slice/job-7/memory.current": f"{3 * GIB}\n",
            "jobs.slice/job-7/memory.stat": f"anon 1\ninactive_file {GIB // 2}\nactive_file 5\n",
            "jobs.slice/memory.max": f"{6 * GIB}\n",
            "jobs.slice/memory.current": f"{5 * GIB}\n",
            "jobs.slice/memory.stat": "inactive_file 0\n",
            "memory.max": "max\n",  # no limit at the top
            "memory.current": f"{9 * GIB}\n",
        },
    )
    root = paths["root"]
    assert cgroup_headroom(paths["proc_cgroup"], root) == HostMemory(GIB, str(root / "jobs.slice/memory.max"))
    assert available_memory(**paths) == HostMemory(GIB, str(root / "jobs.slice/memory.max"))


def test_cgroup_v1_limit_counts_and_its_no_limit_value_does_not(tmp_path: Path) -> None:
    group = "memory/docker/abc"
    paths = _tree(
        tmp_path,
        "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n",
        {
            f"{group}/memory.limit_in_bytes": f"{2 * GIB}\n",
            f"{group}/memory.usage_in_bytes": f"{GIB}\n",
            f"{group}/memory.stat": f"cache 9\ntotal_inactive_file {GIB // 4}\n",
            "memory/docker/memory.limit_in_bytes": "9223372036854771712\n",
            "memory/docker/memory.usage_in_bytes": f"{GIB}\n",
        },
    )
    expected = HostMemory(GIB + GIB // 4, str(paths["root"] / group / "memory.limit_in_bytes"))
    assert available_memory(**paths) == expected


def test_a_container_sees_its_group_at_the_mount_root(tmp_path: Path) -> None:
    """Without a cgroup namespace the path names the host's tree, which is not mounted inside."""
    paths = _tree(
        tmp_path,
        "0::/system.slice/docker-abc.scope\n",
        {"memory.max": f"{GIB}\n", "memory.current": f"{GIB // 2}\n"},
    )
    assert available_memory(**paths) == HostMemory(GIB // 2, str(paths["root"] / "memory.max"))


def test_without_a_limit_the_host_figure_stands(tmp_path: Path) -> None:
    paths = _tree(tmp_path, "0::/\n", {"memory.max": "max\n", "memory.current": "5\n"}, meminfo_kib=1024)
    assert available_memory(**paths) == HostMemory(2**20, "MemAvailable")
    assert available_memory(tmp_path / "none", tmp_path / "none", tmp_path / "none") is None


def test_the_padded_check_refuses_what_only_the_cgroup_limit_cannot_hold(tmp_path: Path) -> None:
    """The host has 64 GiB free, the job's group 1 GiB: the padded batches need about 2.9 GiB."""
    paths = _tree(
        tmp_path,
        "0::/job\n",
        {"job/memory.max": f"{2 * GIB}\n", "job/memory.current": f"{GIB}\n"},
    )
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=8, num_hidden_layers=2))
    budget = memory_budget(fake_loaded(FakeTokenizer(), model), host_memory=lambda: available_memory(**paths))
    assert (budget.host_bytes, budget.device_bytes) == (GIB, GIB)
    spec = CalibSpec(seq_len=8192, batch_size=1, max_samples=4096, layout="padded")
    with pytest.raises(ConfigError) as caught:
        check_padded_memory(4096, 30, spec, budget)
    limit = paths["root"] / "job" / "memory.max"
    assert f"more than the 1 GiB of memory this process may still take ({limit})" in str(caught.value)
    roomy = MemoryBudget(host_bytes=64 * GIB, device_bytes=64 * GIB, hidden_size=8, layers=2)
    check_padded_memory(4096, 30, spec, roomy)  # what the host's figure alone let through
