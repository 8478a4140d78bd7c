"""Stand-ins for the heavy objects a stage receives: a word-level tokenizer and a loaded model.

They let a test drive the pure parts of a stage (captions, batching, holdout text) without
loading transformers, and let it see what the stage asked of them (``FakeTokenizer.calls``).
The run service's pipeline runner has one too (:class:`FakeRun`): it writes a real run's files
without loading a model, so run-folder and fault tests go through the real CLI in milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import attrs

from auto_quantize_model.app import cli
from auto_quantize_model.app.defaults import write_text
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.artifacts import LoadedModel, ReportPaths
from auto_quantize_model.io.manifest import manifest_to_json
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.specs import PipelineSpec
from builders import TINY_DEFAULT, descending, manifest


class FakeTokenizer:
    """Word-level: one id per distinct word, handed out from ``first_id`` in order of appearance.

    Asked for special tokens, it prepends ``bos_id`` (so a test can tell whether the stage asked);
    with ``forbid_special_tokens`` such a call fails the test instead, for code that must never ask.
    Every call is recorded in :attr:`calls`.
    """

    def __init__(
        self,
        *,
        first_id: int = 10,
        bos_id: int = 1,
        pad_token_id: int | None = 0,
        eos_token_id: int | None = 2,
        forbid_special_tokens: bool = False,
    ) -> None:
        self.first_id = first_id
        self.bos_id = bos_id
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.forbid_special_tokens = forbid_special_tokens
        self.vocab: dict[str, int] = {}
        self.calls: list[dict[str, Any]] = []

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        self.calls.append({"texts": list(texts), "add_special_tokens": add_special_tokens})
        assert not (add_special_tokens and self.forbid_special_tokens), "special tokens were asked for"
        out = []
        for text in texts:
            ids = [self.vocab.setdefault(word, self.first_id + len(self.vocab)) for word in text.split()]
            out.append(([self.bos_id] if add_special_tokens else []) + ids)
        return {"input_ids": out}


def fake_loaded(tokenizer: Any, model: Any = None) -> LoadedModel:
    """A :class:`LoadedModel` around ``tokenizer`` on CPU; ``model`` only if the code under test runs it."""
    return LoadedModel(
        model=cast(Any, model),
        tokenizer=cast(Any, tokenizer),
        source="fake",
        architecture="Fake",
        dtype="float32",
        device="cpu",
    )


@attrs.define
class FakeRun:
    """A pipeline runner that writes a real run's files, and raises ``error`` after ``fail_after``.

    ``fail_after``: ``start`` (nothing written), ``state`` (search state saved) or ``manifest``
    (the manifest written too, the other reports not yet).
    """

    error: BaseException | None = None
    fail_after: str = "start"
    calls: list[Path] = attrs.field(factory=list)
    fmt: str = "INT8"
    """The manifest's format; a real name (``INT8_DEFAULT_CFG``) makes the run exportable."""

    def __call__(self, spec: PipelineSpec, folder: Path) -> Artifacts:
        self.calls.append(folder)
        if self.error is not None and self.fail_after == "start":
            raise self.error
        assert spec.autoquant.checkpoint is not None  # the service always points it at the folder
        state = Path(spec.autoquant.checkpoint)
        scheme = spec.manifest.scheme or "unnamed"
        state.write_text(scheme, "utf-8")
        state.with_name(state.name + ".raw-scores.json").write_text("{}", "utf-8")
        if self.error is not None and self.fail_after == "state":
            raise self.error
        ranked = manifest(descending(["a", "b"]), scheme=scheme, fmt=self.fmt)
        written = [folder / f"{scheme}_quant_manifest.json"]
        written[0].write_text(manifest_to_json(ranked), "utf-8")
        if self.error is not None:
            raise self.error
        (folder / "plots").mkdir(exist_ok=True)
        written += [folder / "plots" / "sensitivity-top.png", folder / "plots" / "sensitivity-top.svg"]
        written += [folder / "per-layer-sensitivity.json", folder / "per-layer-sensitivity.md"]
        for path in written[1:]:
            path.write_text("x", "utf-8")
        return Artifacts.of([ranked, ReportPaths(directory=str(folder), files=tuple(map(str, written)))])


Writer = Callable[[Path, str], Path]


def service(runner: FakeRun | None = None, writer: Writer = write_text) -> RunService:
    return RunService(pipeline_runner=runner or FakeRun(), library_importer=lambda: 0.0, text_writer=writer)


def run_into(out: Path, *extra: str, using: RunService | None = None) -> int:
    return cli.main(["run", str(TINY_DEFAULT), "--output", str(out), *extra], service=using or service())


def signal_on_complete(signum: int):  # type: ignore[no-untyped-def]
    """The real writer, which first sends ``signum`` to this process when it writes a ``complete`` record."""

    def write(path: Path, text: str) -> Path:
        if path.name == "run.json" and '"status": "complete"' in text:
            os.kill(os.getpid(), signum)
        return write_text(path, text)

    return write
