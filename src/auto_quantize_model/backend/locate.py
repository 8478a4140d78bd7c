"""Stage 2, ``ExtractLM``: find the text decoder and lm_head inside a loaded (vision-)language model.

Vision-language models nest their language model under different attribute paths depending on
the family and the transformers version, so the search walks a list of known layouts, most
specific first, and falls back to ``get_decoder()``/``get_output_embeddings()``. A candidate
decoder that contains a vision tower is rejected: quantizing it would quietly drag the vision
weights into the LM's budget.

Everything that is neither the decoder, the head, nor one of their ancestors and that holds
parameters (the vision tower, projectors, mergers) is recorded as a vision module, to be kept
out of quantization.

A mixture-of-experts decoder (Qwen3-VL-MoE) is made ready for ModelOpt here, in place: its fused
experts run the ``eager`` implementation (the only one ModelOpt's quantizers see), and with
``experts = "expert"``/``"projection"`` they are split into one linear layer per expert and
projection (see :mod:`auto_quantize_model.backend.experts`). The experts and routers found are
recorded on the :class:`LanguageModel`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.artifacts import LanguageModel
from auto_quantize_model.core.batching import pad_token_id
from auto_quantize_model.errors import InputError
from auto_quantize_model.specs import ExtractSpec

if TYPE_CHECKING:
    from torch import nn


log = logging.getLogger(__name__)

LAYOUTS: tuple[tuple[str, str], ...] = (
    ("model.language_model", "lm_head"),  # Qwen3-VL, Qwen2.5-VL (transformers >= 4.52), LLaVA, Gemma 3
    ("model.text_model", "lm_head"),  # Idefics3, SmolVLM
    ("language_model.model", "language_model.lm_head"),  # older wrappers holding a whole causal LM
    ("model", "lm_head"),  # plain causal LMs (Llama, Qwen, Mistral), Qwen2-VL before 4.52
    ("transformer", "lm_head"),  # GPT-2, Bloom, Falcon
    ("gpt_neox", "embed_out"),  # GPT-NeoX, Pythia
)
"""(decoder path, head path) pairs, tried in order; the first that fits wins."""

ACCESSOR_FALLBACK = "get_decoder() + get_output_embeddings()"

VISION_NAMES = frozenset(
    {
        "visual",
        "vision",
        "vision_tower",
        "vision_model",
        "vision_encoder",
        "image_encoder",
        "multi_modal_projector",
        "mm_projector",
        "connector",
    }
)
"""Module names that mark vision parts; a decoder containing one is not a text decoder."""


@attrs.frozen
class LMLocation:
    """Where the language model sits inside a full model (names only, no modules)."""

    prefix: str
    """Decoder path, empty when the decoder is the root itself."""
    head_name: str
    vision_modules: tuple[str, ...]


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _has_vision_part(module: nn.Module) -> bool:
    return any(
        name and name.rsplit(".", 1)[-1] in VISION_NAMES
        for name, _ in module.named_modules(remove_duplicate=False)
    )


def _is_head(module: nn.Module | None) -> bool:
    """An output projection: a module with a 2-D weight (vocab x hidden)."""
    weight = getattr(module, "weight", None)
    return weight is not None and getattr(weight, "ndim", 0) == 2


def _fits(decoder: nn.Module | None, head: nn.Module | None) -> bool:
    if decoder is None or head is None or decoder is head or not _is_head(head):
        return False
    if any(sub is head for sub in decoder.modules()):
        return False
    return not _has_vision_part(decoder)


def _name_of(root: nn.Module, target: nn.Module) -> str | None:
    for name, sub in root.named_modules():
        if sub is target:
            return str(name)
    return None


def _by_accessors(model: nn.Module) -> tuple[str, str] | None:
    """Ask the model itself (transformers' ``get_decoder``/``get_output_embeddings``)."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None
    try:
        decoder, head = get_decoder(), get_head()
    # not a stub of ours: transformers' base accessors raise this for models that lack them
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if decoder is model or not _fits(decoder, head):
        return None
    prefix, head_name = _name_of(model, decoder), _name_of(model, head)
    if prefix is None or head_name is None:
        return None
    return prefix, head_name


def outside_modules(model: nn.Module, prefix: str, head_name: str) -> tuple[str, ...]:
    """Top-most modules with parameters that are neither the LM parts nor their ancestors.

    For Qwen3-VL this is ``("model.visual",)``; for a plain causal LM it is empty.
    """
    keep = (prefix, head_name)

    def related(name: str) -> bool:
        return any(k == name or k.startswith(name + ".") or name.startswith(k + ".") for k in keep)

    found: list[str] = []

    def walk(module: nn.Module, name: str) -> None:
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if related(full):
                walk(child, full)
            elif any(True for _ in child.parameters()):
                found.append(full)

    walk(model, "")
    return tuple(found)


def find_language_model(model: nn.Module) -> LMLocation:
    """Locate decoder and head by the known :data:`LAYOUTS`, then by the model's own accessors."""
    for decoder_path, head_path in LAYOUTS:
        if _fits(_submodule(model, decoder_path), _submodule(model, head_path)):
            return LMLocation(decoder_path, head_path, outside_modules(model, decoder_path, head_path))
    found = _by_accessors(model)
    if found is not None:
        prefix, head_name = found
        return LMLocation(prefix, head_name, outside_modules(model, prefix, head_name))
    tried = "; ".join(f"{d} + {h}" for d, h in LAYOUTS) + f"; {ACCESSOR_FALLBACK}"
    children = ", ".join(f"{n} ({type(c).__name__})" for n, c in model.named_children()) or "none"
    raise InputError(
        f"cannot find a language model and lm_head in {type(model).__name__}: tried {tried}; "
        f"its top-level children are {children}"
    )


def _inside(prefix: str, name: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def extract_language_model(model: nn.Module, tokenizer: Any, spec: ExtractSpec) -> LanguageModel:
    """Locate the LM; prepare its experts for AutoQuant (in place) when it has any."""
    where = find_language_model(model)
    decoder = model.get_submodule(where.prefix) if where.prefix else model
    from auto_quantize_model.backend.experts import prepare_experts, router_names

    layers = prepare_experts(model, spec.experts)
    experts = tuple(layer.name for layer in layers if _inside(where.prefix, layer.name))
    routers = tuple(name for name in router_names(model) if _inside(where.prefix, name)) if experts else ()
    if not experts and spec.experts != "layer":
        log.warning(
            "extract.experts = %r: %s has no mixture-of-experts layers, nothing to split",
            spec.experts,
            type(decoder).__name__,
        )
    return LanguageModel(
        module=decoder,
        lm_head=model.get_submodule(where.head_name),
        prefix=where.prefix,
        head_name=where.head_name,
        full_model=model,
        vision_modules=where.vision_modules,
        scope=spec.scope,
        pad_token_id=pad_token_id(tokenizer, getattr(model, "config", None)),
        experts=experts,
        expert_grouping=spec.experts,
        routers=routers,
    )
