"""Rebuild the small pictures and captions shipped in ``images/`` (the ``builtin`` image pairs).

Not imported at runtime; run it by hand after editing the scenes below::

    python src/auto_quantize_model/data/_build_images.py

Each picture is a few flat shapes drawn with PIL on a plain background, in a handful of sizes and
aspect ratios so the processor gives the pairs different image-token counts, and each caption
says what is drawn. They exist so the tiny image pipeline and the tests run offline; they are no
calibration set for a real model (use COCO captions or your own pairs for that).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent / "images"
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
    "orange": (240, 140, 30),
}
SIZES = ((64, 64), (96, 64), (64, 96), (80, 80), (128, 64), (48, 48))
SCENES = (
    ("red", "circle", "blue"),
    ("yellow", "square", "black"),
    ("green", "triangle", "white"),
    ("white", "stripe", "grey"),
    ("orange", "circle", "green"),
    ("blue", "square", "yellow"),
    ("black", "triangle", "orange"),
    ("red", "stripe", "white"),
    ("grey", "circle", "red"),
    ("green", "square", "blue"),
    ("yellow", "triangle", "grey"),
    ("blue", "stripe", "orange"),
    ("white", "circle", "black"),
    ("orange", "square", "white"),
    ("red", "triangle", "green"),
    ("black", "stripe", "yellow"),
    ("blue", "circle", "white"),
    ("green", "stripe", "black"),
    ("yellow", "circle", "blue"),
    ("grey", "square", "orange"),
    ("white", "triangle", "red"),
    ("orange", "stripe", "grey"),
    ("red", "square", "yellow"),
    ("black", "circle", "white"),
)


def draw(shape: str, colour: str, background: str, size: tuple[int, int]) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, COLOURS[background])
    pen = ImageDraw.Draw(image)
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "triangle":
        corners = [
            (width // 2, height // 5),
            (width // 5, 4 * height // 5),
            (4 * width // 5, 4 * height // 5),
        ]
        pen.polygon(corners, fill=fill)
    else:
        for x in range(0, width, 16):
            pen.rectangle((x, 0, x + 7, height), fill=fill)
    return image


def caption(shape: str, colour: str, background: str) -> str:
    if shape == "stripe":
        return f"Vertical {colour} stripes on a {background} background."
    return f"A {colour} {shape} in the middle of a {background} picture."


def build(out_dir: Path = HERE) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (colour, shape, background) in enumerate(SCENES):
        name = f"{index:02d}-{colour}-{shape}.png"
        draw(shape, colour, background, SIZES[index % len(SIZES)]).save(out_dir / name, optimize=True)
        lines.append(json.dumps({"image": name, "text": caption(shape, colour, background)}))
    (out_dir / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    build()
