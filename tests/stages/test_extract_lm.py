"""ExtractLM on small fake module trees, one per known layout, plus the real tiny Qwen3-VL."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pytest_mock import MockerFixture
from torch import nn
from transformers import PreTrainedTokenizerBase

from auto_quantize_model.artifacts import LanguageModel, LoadedModel
from auto_quantize_model.backend.lm_forward import next_token_loss, selected_logits
from auto_quantize_model.backend.locate import (
    ACCESSOR_FALLBACK,
    LAYOUTS,
    LMLocation,
    extract_language_model,
    find_language_model,
    outside_modules,
)
from auto_quantize_model.core.batching import IGNORE_INDEX
from auto_quantize_model.errors import InputError
from auto_quantize_model.pipeline import Artifacts, Pipeline
from auto_quantize_model.specs import ExtractSpec, LoadSpec
from auto_quantize_model.stages.extract_lm import ExtractLM
from auto_quantize_model.stages.load_model import LoadModel

VOCAB, HIDDEN = 32, 8


class Decoder(nn.Module):
    """Stands in for a text decoder: embeddings and two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([nn.Linear(HIDDEN, HIDDEN) for _ in range(2)])


class Vision(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(HIDDEN, HIDDEN)])


def head() -> nn.Linear:
    return nn.Linear(HIDDEN, VOCAB, bias=False)


def tree(**children: nn.Module) -> nn.Module:
    """An nn.Module whose children are exactly ``children``, in order."""
    root = nn.Module()
    for name, child in children.items():
        root.add_module(name, child)
    return root


class Accessible(nn.Module):
    """A model that only its own accessors can explain (unknown attribute names)."""

    def __init__(self) -> None:
        super().__init__()
        self.stuff = tree(image_encoder=Vision(), text=Decoder())
        self.out = head()

    def get_decoder(self) -> nn.Module:
        return self.stuff.get_submodule("text")

    def get_output_embeddings(self) -> nn.Module:
        return self.out


LAYOUT_CASES = [
    pytest.param(
        lambda: tree(model=tree(visual=Vision(), language_model=Decoder()), lm_head=head()),
        LMLocation("model.language_model", "lm_head", ("model.visual",)),
        id="qwen3-vl",
    ),
    pytest.param(
        lambda: tree(
            model=tree(
                vision_tower=Vision(), multi_modal_projector=nn.Linear(4, 4), language_model=Decoder()
            ),
            lm_head=head(),
        ),
        LMLocation("model.language_model", "lm_head", ("model.vision_tower", "model.multi_modal_projector")),
        id="llava-gemma3",
    ),
    pytest.param(
        lambda: tree(
            model=tree(vision_model=Vision(), connector=nn.Linear(4, 4), text_model=Decoder()), lm_head=head()
        ),
        LMLocation("model.text_model", "lm_head", ("model.vision_model", "model.connector")),
        id="idefics3",
    ),
    pytest.param(
        lambda: tree(
            vision_tower=Vision(),
            multi_modal_projector=nn.Linear(4, 4),
            language_model=tree(model=Decoder(), lm_head=head()),
        ),
        LMLocation(
            "language_model.model", "language_model.lm_head", ("vision_tower", "multi_modal_projector")
        ),
        id="old-llava",
    ),
    pytest.param(
        lambda: tree(visual=Vision(), model=Decoder(), lm_head=head()),
        LMLocation("model", "lm_head", ("visual",)),
        id="old-qwen2-vl",
    ),
    pytest.param(
        lambda: tree(model=Decoder(), lm_head=head()), LMLocation("model", "lm_head", ()), id="causal-lm"
    ),
    pytest.param(
        lambda: tree(transformer=Decoder(), lm_head=head()),
        LMLocation("transformer", "lm_head", ()),
        id="gpt2",
    ),
    pytest.param(
        lambda: tree(gpt_neox=Decoder(), embed_out=head()), LMLocation("gpt_neox", "embed_out", ()), id="neox"
    ),
    pytest.param(Accessible, LMLocation("stuff.text", "out", ("stuff.image_encoder",)), id="accessors"),
]


@pytest.mark.parametrize(("build", "expected"), LAYOUT_CASES)
def test_find_language_model_per_layout(build: Any, expected: LMLocation) -> None:
    model = build()
    assert find_language_model(model) == expected


def test_tied_head_is_still_found() -> None:
    model = tree(model=tree(visual=Vision(), language_model=Decoder()), lm_head=head())
    decoder = model.get_submodule("model.language_model")
    lm_head = model.get_submodule("lm_head")
    assert isinstance(decoder, Decoder)
    assert isinstance(lm_head, nn.Linear)
    lm_head.weight = decoder.embed_tokens.weight
    assert find_language_model(model).prefix == "model.language_model"


def test_decoder_holding_a_vision_tower_is_rejected() -> None:
    """``model`` + ``lm_head`` would fit by name, but ``model`` also holds the vision tower."""
    model = tree(model=tree(vision_tower=Vision(), llm=Decoder()), lm_head=head())
    with pytest.raises(InputError) as err:
        find_language_model(model)
    message = str(err.value)
    assert "top-level children are model (Module), lm_head (Linear)" in message


def test_error_lists_paths_tried_and_children() -> None:
    model = tree(encoder=Decoder(), classifier=nn.Linear(HIDDEN, 2))
    with pytest.raises(InputError) as err:
        find_language_model(model)
    message = str(err.value)
    assert message.startswith("cannot find a language model and lm_head in Module: tried ")
    for decoder_path, head_path in LAYOUTS:
        assert f"{decoder_path} + {head_path}" in message
    assert ACCESSOR_FALLBACK in message
    assert "top-level children are encoder (Decoder), classifier (Linear)" in message
    assert "\n" not in message


def test_a_head_must_be_a_projection() -> None:
    """``lm_head`` without a 2-D weight (here a norm) is not an output projection."""
    model = tree(model=Decoder(), lm_head=nn.LayerNorm(HIDDEN))
    with pytest.raises(InputError, match="lm_head \\(LayerNorm\\)"):
        find_language_model(model)


def test_outside_modules_skips_parameterless_and_ancestors() -> None:
    model = tree(
        model=tree(visual=Vision(), rotary=nn.Identity(), language_model=Decoder()),
        lm_head=head(),
        dropout=nn.Dropout(),
    )
    assert outside_modules(model, "model.language_model", "lm_head") == ("model.visual",)


@pytest.mark.parametrize("scope", ["language_model", "full_model"])
def test_extract_lm_stage_builds_the_artifact(mocker: MockerFixture, scope: Any) -> None:
    model = tree(model=tree(visual=Vision(), language_model=Decoder()), lm_head=head())
    tokenizer = mocker.Mock(spec=PreTrainedTokenizerBase, pad_token_id=3, eos_token_id=1)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source="fake",
        architecture="Module",
        dtype="float32",
        device="cpu",
    )
    lm = ExtractLM(ExtractSpec(scope=scope)).run(Artifacts.of([loaded]))
    assert isinstance(lm, LanguageModel)
    assert lm.module is model.get_submodule("model.language_model")
    assert lm.lm_head is model.get_submodule("lm_head")
    assert lm.full_model is model
    assert (lm.prefix, lm.head_name, lm.vision_modules) == (
        "model.language_model",
        "lm_head",
        ("model.visual",),
    )
    assert lm.scope == scope
    assert lm.pad_token_id == 3


def test_extract_lm_default_scope_is_language_model() -> None:
    assert ExtractLM().spec.scope == "language_model"
    assert ExtractLM.requires == (LoadedModel,)
    assert ExtractLM.produces is LanguageModel


def test_root_decoder_when_model_is_the_decoder_itself() -> None:
    """A bare decoder has no head anywhere: refused, naming its children."""
    with pytest.raises(
        InputError, match="children are embed_tokens \\(Embedding\\), layers \\(ModuleList\\)"
    ):
        extract_language_model(Decoder(), SimpleNamespace(pad_token_id=0), ExtractSpec())


@pytest.mark.slow
def test_extract_from_real_tiny_qwen3_vl(tiny_loaded: LoadedModel) -> None:
    lm = ExtractLM().run(Artifacts.of([tiny_loaded]))
    assert type(lm.module).__name__ == "Qwen3VLTextModel"
    assert (lm.prefix, lm.head_name, lm.vision_modules) == (
        "model.language_model",
        "lm_head",
        ("model.visual",),
    )
    assert lm.pad_token_id == tiny_loaded.tokenizer.pad_token_id == 0
    names = {name for name, _ in lm.full_model.named_modules()}
    assert all(name in names for name in (lm.prefix, lm.head_name, *lm.vision_modules))


@pytest.mark.slow
def test_load_then_extract_from_a_checkpoint(tiny_checkpoint: Path) -> None:
    """The two stages chained as a pipeline; the decoder + head give the full model's logits."""
    store = Pipeline([LoadModel(LoadSpec(str(tiny_checkpoint), device="cpu")), ExtractLM()]).run()
    lm = store.get(LanguageModel)
    tokenizer = store.get(LoadedModel).tokenizer
    ids = tokenizer(["A cat sleeps on a warm windowsill."], return_tensors="pt")["input_ids"]
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX  # nothing predicts the first token anyway
    batch = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        picked = selected_logits(lm.module, lm.lm_head, batch)
        full = lm.full_model(input_ids=ids).logits
    assert torch.allclose(picked, full[0, :-1], atol=1e-5)  # position t predicts token t + 1
    assert torch.isfinite(next_token_loss(picked, batch))
