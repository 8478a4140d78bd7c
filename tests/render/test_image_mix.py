"""The report's image mix lines: shares, sizes, and the layers whose image tokens outrun the text range."""

from __future__ import annotations

import json

import attrs

from auto_quantize_model.artifacts import ActivationRange, ImageMix
from auto_quantize_model.io.manifest import manifest_from_dict, manifest_to_json
from auto_quantize_model.manifest_records import DatasetInfo
from auto_quantize_model.render.image_mix import image_mix_lines
from builders import manifest


def test_the_mix_and_the_widest_image_ranges_are_reported() -> None:
    ranges = (
        ActivationRange("a", image_absmax=2.0, text_absmax=1.0),
        ActivationRange("b", image_absmax=0.5, text_absmax=1.0),
        ActivationRange("c", image_absmax=3.0, text_absmax=1.0),
    )
    mix = ImageMix(
        pairs=3,
        image_tokens=300,
        text_tokens=100,
        caption_tokens=40,
        image_sizes=((64, 64, 2), (96, 64, 1)),
        prompt="Describe this image.",
        ranges=ranges,
    )
    lines = image_mix_lines(mix)
    assert lines[:2] == [
        "- **Images:** 3 image + caption pairs, prompt 'Describe this image.'; 300 image tokens and 100 text "
        "tokens (75.0% image), 40 caption tokens scored",
        "- **Image sizes (pairs):** 64x64 (2), 96x64 (1)",
    ]
    assert (
        "In 2 of 3 layers image tokens reach beyond the text tokens' range (median image/text ratio 2.00)"
        in (lines[5])
    )
    assert lines[-3:] == ["| `c` | 3 | 1 | 3.00 |", "| `a` | 2 | 1 | 2.00 |", "| `b` | 0.5 | 1 | 0.50 |"]


def test_captions_alone_add_nothing() -> None:
    assert image_mix_lines(None) == []


def test_the_mix_survives_the_manifest_file_and_old_manifests_have_none() -> None:
    mix = ImageMix(
        pairs=2,
        image_tokens=128,
        text_tokens=40,
        caption_tokens=12,
        image_sizes=((64, 64, 2),),
        prompt="Describe this image.",
        ranges=(ActivationRange("lm_head", 1.5, 0.75),),
    )
    dataset = DatasetInfo("builtin", "ab", "packed", 512, 2, 2, 2, 168, 170, 1, images=mix)
    written = attrs.evolve(manifest([("a", 1.0)]), dataset=dataset)
    data = json.loads(manifest_to_json(written))
    assert manifest_from_dict(data, "m.json") == written
    del data["dataset"]["images"]
    assert manifest_from_dict(data, "m.json").dataset == attrs.evolve(dataset, images=None)
