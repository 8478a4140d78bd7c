"""Image + caption pairs for image-conditioned calibration: reading and checking, without torch.

``[calib] images = PATH`` names one of:

* a folder holding exactly one JSON-lines file (``*.jsonl``), or that file itself: one object a
  line, ``{"image": "relative/path.png", "text": "a caption"}``, image paths relative to the
  file's folder (absolute paths are taken as they are);
* a COCO captions annotation file (``captions_<split>.json``), or a folder holding one (directly
  or under ``annotations/``): its ``images`` give file names, its ``annotations`` one caption
  each; the images are looked for in ``<split>/`` beside the annotation file, beside its folder,
  or in its own folder. Every annotation is a pair, in file order;
* ``builtin``: the small generated pictures shipped with the package (see
  :func:`auto_quantize_model.data.builtin_images_dir`).

Every pair that will be used is checked before the model loads, each problem one line that names
the file and line (or annotation) and the fix: an image that is missing, unreadable, in a pixel
mode that is not colour or grey (16-bit, float), with a side ratio the Qwen-VL processor refuses
(over 200:1) or more pixels than PIL decodes safely; a pair without text. Images are opened only
far enough to read their header (PIL's ``verify``), so checking 512 pairs is cheap.

Held-out pairs: calibration takes the first ``calib.max_samples`` pairs; validation measures on
the pairs after them, so a source meant for both needs more pairs than ``max_samples``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from auto_quantize_model.errors import ConfigError, InputError

SUPPORTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
"""PIL modes that convert to RGB without losing range: the processor's first step is that
conversion, and 16-bit or float pixels (``I``, ``I;16``, ``F``) would be clipped into garbage."""
MAX_ASPECT_RATIO = 200
"""Qwen-VL's resize (``smart_resize``) raises beyond this long/short side ratio."""
BUILTIN = "builtin"


@attrs.frozen
class ImagePair:
    """One calibration sample: a picture and the caption the model should produce for it."""

    image: Path
    text: str
    origin: str
    """Where it was read (``pairs.jsonl:3``, ``captions_val2017.json annotation #7 (id 42)``),
    named in every message about it."""
    size: tuple[int, int] = (0, 0)
    """Width and height in pixels, read from the image by :func:`check_pairs` (0 before)."""


@attrs.frozen
class PairSource:
    """What ``calib.images`` named, and every pair it holds, unchecked."""

    label: str
    """The file the pairs came from (or ``builtin``): reports and the manifest name it."""
    pairs: tuple[ImagePair, ...]


def _builtin_dir() -> Path:
    from auto_quantize_model.data import builtin_images_dir

    return builtin_images_dir()


def _jsonl_pairs(path: Path) -> tuple[ImagePair, ...]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"image pairs file {path} cannot be read as UTF-8 text: {err}") from err
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                f'{where}: not a JSON object ({err.msg}); write {{"image": "a.png", "text": "a caption"}}'
            ) from err
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not record["image"]:
            raise InputError(f'{where}: no "image" path; write {{"image": "a.png", "text": "a caption"}}')
        pairs.append(_pair(path.parent, record["image"], record.get("text"), where))
    if not pairs:
        raise InputError(f"image pairs file {path} holds no pairs: expected one JSON object a line")
    return tuple(pairs)


def _pair(folder: Path, image: str, text: Any, where: str) -> ImagePair:
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: the pair for {image} has no text; give it a caption or remove the line")
    return ImagePair(image=folder / image, text=text.strip(), origin=where)


def _coco_image_dir(annotations: Path) -> Path:
    split = annotations.stem.removeprefix("captions_")
    for folder in (annotations.parent / split, annotations.parent.parent / split):
        if folder.is_dir():
            return folder
    return annotations.parent


def _coco_pairs(path: Path) -> tuple[ImagePair, ...]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"COCO captions file {path} cannot be read as JSON: {err}") from err
    if not isinstance(document, dict) or not isinstance(document.get("annotations"), list):
        raise InputError(f'COCO captions file {path} has no "annotations" list; is it a captions_*.json?')
    files = {
        entry.get("id"): entry.get("file_name")
        for entry in document.get("images", [])
        if isinstance(entry, dict)
    }
    folder = _coco_image_dir(path)
    pairs = []
    for index, entry in enumerate(document["annotations"], start=1):
        entry = entry if isinstance(entry, dict) else {}
        where = f"{path} annotation #{index} (id {entry.get('id')})"
        name = files.get(entry.get("image_id"))
        if not isinstance(name, str) or not name:
            raise InputError(
                f"{where}: image_id {entry.get('image_id')} has no file_name in the images list; "
                "fix the annotation file"
            )
        pairs.append(_pair(folder, name, entry.get("caption"), where))
    if not pairs:
        raise InputError(f"COCO captions file {path} holds no annotations")
    return tuple(pairs)


def _find_one(folder: Path) -> Path:
    jsonl = sorted(folder.glob("*.jsonl"))
    coco = sorted([*folder.glob("captions_*.json"), *folder.glob("annotations/captions_*.json")])
    found = [*jsonl, *coco]
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(
            f"calib.images: {folder} holds no *.jsonl pairs file and no COCO captions_*.json; "
            "add one or point calib.images at the file"
        )
    names = ", ".join(path.name for path in found)
    raise InputError(f"calib.images: {folder} holds several pairs files ({names}); point calib.images at one")


def read_pair_source(value: str) -> PairSource:
    """Every pair of ``calib.images``, in file order, unchecked (:func:`check_pairs` opens the images)."""
    path = _builtin_dir() if value == BUILTIN else Path(value)
    if not path.exists():
        raise InputError(f"calib.images: {path} does not exist; give a folder of pairs or a pairs file")
    file = _find_one(path) if path.is_dir() else path
    pairs = _coco_pairs(file) if file.suffix == ".json" else _jsonl_pairs(file)
    return PairSource(label=BUILTIN if value == BUILTIN else str(file), pairs=pairs)


def take_pairs(
    source: PairSource, count: int, skip: int = 0, key: str = "calib.max_samples"
) -> tuple[ImagePair, ...]:
    """Pairs ``skip`` to ``skip + count``; too few is an error, as for captions (the count is reported)."""
    if count <= 0:
        raise ConfigError(f"{key}: must be > 0, got {count}")
    available = len(source.pairs) - skip
    if available < count:
        taken = f" after the {skip} used for calibration" if skip else ""
        raise ConfigError(
            f"calib.images: {source.label} holds {max(available, 0)} pairs{taken} but {key} asks "
            f"for {count}: lower {key} or add pairs"
        )
    return source.pairs[skip : skip + count]


def check_image(pair: ImagePair) -> ImagePair:
    """``pair`` with its size, or the one-line reason its image cannot be used."""
    from PIL import Image

    where = f"{pair.origin}: image {pair.image}"
    if not pair.image.is_file():
        raise InputError(f"{where} does not exist; fix the path or remove the pair")
    try:
        with Image.open(pair.image) as image:
            mode, size = image.mode, image.size
            image.verify()
    except Image.DecompressionBombError as err:
        raise InputError(
            f"{where} has more pixels than PIL decodes safely ({err}); downscale it below "
            f"{Image.MAX_IMAGE_PIXELS} pixels"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{where} cannot be read as an image ({err}); replace or remove it") from err
    if mode not in SUPPORTED_MODES:
        raise InputError(
            f"{where} has pixel mode {mode}, which does not convert to 8-bit RGB without clipping; "
            "save it as 8-bit RGB or greyscale"
        )
    width, height = size
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InputError(
            f"{where} is {width}x{height}, beyond the processor's {MAX_ASPECT_RATIO}:1 side ratio; crop it"
        )
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        raise InputError(
            f"{where} is {width}x{height}, more pixels than PIL decodes safely "
            f"({Image.MAX_IMAGE_PIXELS}); downscale it"
        )
    return attrs.evolve(pair, size=(width, height))


def check_pairs(pairs: Sequence[ImagePair]) -> tuple[ImagePair, ...]:
    """Every pair checked (:func:`check_image`), in order; the first problem is raised."""
    return tuple(check_image(pair) for pair in pairs)


def pairs_sha256(pairs: Sequence[ImagePair]) -> str:
    """Hash of the pairs used: each caption and the bytes of its image, so a changed picture shows."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(pair.text.encode("utf-8") + b"\n")
        digest.update(hashlib.sha256(pair.image.read_bytes()).digest())
    return digest.hexdigest()


def pairs_problem(value: str, count: int) -> str | None:
    """The first problem of the first ``count`` pairs of ``value`` (preflight), or None."""
    try:
        check_pairs(take_pairs(read_pair_source(value), count))
    except (InputError, ConfigError) as err:
        return str(err)
    return None
