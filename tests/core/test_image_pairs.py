"""Image + caption pairs: both file formats read in order, and every bad input refused in one line
that names the file and line (or annotation) before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from auto_quantize_model.core.image_pairs import (
    BUILTIN,
    check_pairs,
    pairs_problem,
    pairs_sha256,
    read_pair_source,
    take_pairs,
)
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.io.pipeline_file import load_pipeline
from auto_quantize_model.io.preflight import preflight


def _png(path: Path, size: tuple[int, int] = (32, 24), mode: str = "RGB") -> Path:
    Image.new(mode, size).save(path)
    return path


def _jsonl(folder: Path, *records: object) -> Path:
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_jsonl_pairs_are_read_in_order_relative_to_their_file(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png", (32, 24))
    _png(tmp_path / "img" / "b.png", (10, 40), mode="L")
    _jsonl(tmp_path, {"image": "img/a.png", "text": " A cat. "}, {"image": "img/b.png", "text": "A dog."})
    source = read_pair_source(str(tmp_path))
    assert source.label == str(tmp_path / "pairs.jsonl")
    pairs = check_pairs(take_pairs(source, 2))
    assert [(p.image, p.text, p.origin, p.size) for p in pairs] == [
        (tmp_path / "img" / "a.png", "A cat.", f"{tmp_path / 'pairs.jsonl'}:1", (32, 24)),
        (tmp_path / "img" / "b.png", "A dog.", f"{tmp_path / 'pairs.jsonl'}:2", (10, 40)),
    ]


def test_coco_captions_find_their_split_folder_and_give_one_pair_per_annotation(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    _png(tmp_path / "val2017" / "000000000042.jpg", (40, 30))
    document = {
        "images": [{"id": 42, "file_name": "000000000042.jpg"}],
        "annotations": [
            {"id": 7, "image_id": 42, "caption": "Two people on a bench."},
            {"id": 8, "image_id": 42, "caption": "A park in the sun."},
        ],
    }
    file = tmp_path / "annotations" / "captions_val2017.json"
    file.write_text(json.dumps(document), encoding="utf-8")
    pairs = check_pairs(read_pair_source(str(tmp_path)).pairs)
    assert [(p.image.name, p.image.parent.name, p.text, p.size) for p in pairs] == [
        ("000000000042.jpg", "val2017", "Two people on a bench.", (40, 30)),
        ("000000000042.jpg", "val2017", "A park in the sun.", (40, 30)),
    ]
    assert pairs[1].origin == f"{file} annotation #2 (id 8)"


def test_the_builtin_pairs_are_24_small_checked_pictures() -> None:
    source = read_pair_source(BUILTIN)
    pairs = check_pairs(source.pairs)
    assert (source.label, len(pairs)) == ("builtin", 24)
    assert pairs[0].text == "A red circle in the middle of a blue picture."
    assert {p.size for p in pairs} == {(64, 64), (96, 64), (64, 96), (80, 80), (128, 64), (48, 48)}


def test_the_hash_changes_with_a_picture_even_when_the_captions_do_not(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (8, 8))
    _jsonl(tmp_path, {"image": "a.png", "text": "x"})
    before = pairs_sha256(read_pair_source(str(tmp_path)).pairs)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    assert pairs_sha256(read_pair_source(str(tmp_path)).pairs) != before


def _problem(tmp_path: Path, *records: object) -> str:
    _jsonl(tmp_path, *records)
    with pytest.raises(InputError) as caught:
        check_pairs(read_pair_source(str(tmp_path)).pairs)
    return str(caught.value)


def test_a_missing_image_names_file_line_and_fix(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    message = _problem(tmp_path, {"image": "a.png", "text": "ok"}, {"image": "gone.png", "text": "x"})
    assert message == (
        f"{tmp_path / 'pairs.jsonl'}:2: image {tmp_path / 'gone.png'} does not exist; "
        "fix the path or remove the pair"
    )


def test_a_corrupt_image_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    message = _problem(tmp_path, {"image": "bad.png", "text": "x"})
    assert message.startswith(f"{tmp_path / 'pairs.jsonl'}:1: image {tmp_path / 'bad.png'} cannot be read")
    assert message.endswith("; replace or remove it")


def test_a_16_bit_image_is_an_unsupported_mode(tmp_path: Path) -> None:
    _png(tmp_path / "deep.png", mode="I;16")
    message = _problem(tmp_path, {"image": "deep.png", "text": "x"})
    assert message == (
        f"{tmp_path / 'pairs.jsonl'}:1: image {tmp_path / 'deep.png'} has pixel mode I;16, which does not "
        "convert to 8-bit RGB without clipping; save it as 8-bit RGB or greyscale"
    )


def test_an_image_the_processor_refuses_is_named(tmp_path: Path) -> None:
    _png(tmp_path / "thin.png", (402, 2))
    message = _problem(tmp_path, {"image": "thin.png", "text": "x"})
    assert message == (
        f"{tmp_path / 'pairs.jsonl'}:1: image {tmp_path / 'thin.png'} is 402x2, beyond the processor's "
        "200:1 side ratio; crop it"
    )


@pytest.mark.parametrize("text", [None, "", "   ", 3])
def test_a_pair_without_text_names_its_line(tmp_path: Path, text: object) -> None:
    _png(tmp_path / "a.png")
    record = {"image": "a.png"} if text is None else {"image": "a.png", "text": text}
    message = _problem(tmp_path, {"image": "a.png", "text": "fine"}, record)
    assert message == (
        f"{tmp_path / 'pairs.jsonl'}:2: the pair for a.png has no text; give it a caption or remove the line"
    )


def test_a_line_that_is_not_json_names_the_expected_shape(tmp_path: Path) -> None:
    (tmp_path / "pairs.jsonl").write_text('{"image": "a.png", "text": "x"}\nimage=a.png\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"pairs\.jsonl:2: not a JSON object \(Expecting value\); write"):
        read_pair_source(str(tmp_path))


def test_a_folder_with_two_pair_files_asks_which(tmp_path: Path) -> None:
    _jsonl(tmp_path, {"image": "a.png", "text": "x"})
    (tmp_path / "more.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(InputError) as caught:
        read_pair_source(str(tmp_path))
    assert str(caught.value) == (
        f"calib.images: {tmp_path} holds several pairs files (more.jsonl, pairs.jsonl); "
        "point calib.images at one"
    )


def test_asking_for_more_pairs_than_there_are_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        take_pairs(read_pair_source(BUILTIN), 30)
    assert str(caught.value) == (
        "calib.images: builtin holds 24 pairs but calib.max_samples asks for 30: lower calib.max_samples "
        "or add pairs"
    )


def test_only_the_pairs_used_are_checked(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _jsonl(tmp_path, {"image": "a.png", "text": "x"}, {"image": "gone.png", "text": "y"})
    assert pairs_problem(str(tmp_path), 1) is None
    assert pairs_problem(str(tmp_path), 2) == (
        f"{tmp_path / 'pairs.jsonl'}:2: image {tmp_path / 'gone.png'} does not exist; "
        "fix the path or remove the pair"
    )


def test_preflight_refuses_a_bad_pair_before_any_model_loads(tmp_path: Path) -> None:
    _jsonl(tmp_path, {"image": "gone.png", "text": "y"})
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[model]\npath = "builtin:tiny-qwen3-vl"\n[calib]\nimages = "."\nmax_samples = 1\n', encoding="utf-8"
    )
    spec = load_pipeline(pipeline, [])
    assert spec.calib.images == str(tmp_path)  # relative to the pipeline file's folder
    with pytest.raises(InputError) as caught:
        preflight(spec, source="p.toml")
    assert str(caught.value) == (
        f"p.toml: calib.images: {tmp_path / 'pairs.jsonl'}:1: image {tmp_path / 'gone.png'} does not exist; "
        "fix the path or remove the pair"
    )


def test_preflight_wants_pairs_left_for_validation(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[model]\npath = "builtin:tiny-qwen3-vl"\n[calib]\nimages = "builtin"\nmax_samples = 24\n'
        "[validate]\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        preflight(load_pipeline(pipeline, []), source="p.toml")
    assert str(caught.value) == (
        "p.toml: validate.holdout_samples: calib.images holds 24 pairs and calib.max_samples takes all of "
        "them, so none is left to measure on; add pairs or lower calib.max_samples"
    )
