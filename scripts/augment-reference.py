#!/usr/bin/env python3
"""Reference outputs of torchvision's TrivialAugmentWide / RandAugment ops on PIL images, for
tests/data_transform.rs (tests/fixtures/augment-reference.json).

torchvision and torch are not needed: the few pure-Python pieces torchvision 0.2x uses on the PIL path are
restated below (`_get_inverse_affine_matrix`, the calls of `_apply_op` and `functional_pil`), and the magnitude
tables of `_augmentation_space` are computed the way torch's CPU `linspace` computes float32 values (scalar
path: `start + step * i` below the halfway index, `end - step * (steps - 1 - i)` from it on, all in float32).

Made with Pillow 13.0.0 and numpy 2.4 on x86-64 Linux:

    python3 -m venv /tmp/aug-venv && /tmp/aug-venv/bin/pip install pillow numpy
    /tmp/aug-venv/bin/python scripts/augment-reference.py > tests/fixtures/augment-reference.json

Floats are written as the hex of their IEEE-754 double bits, so the Rust side reads exactly the values used.
Images are hex strings of row-major RGB bytes.
"""

import json
import math
import struct
import sys

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

BINS = 31


def bits(x: float) -> str:
    return struct.pack(">d", float(x)).hex()


def hexpix(img: Image.Image) -> str:
    assert img.mode == "RGB"
    return img.tobytes().hex()


def linspace_f32(start: float, end: float, steps: int) -> list:
    """torch.linspace(start, end, steps) (float32, CPU scalar path), as Python floats."""
    s, e = np.float32(start), np.float32(end)
    step = (e - s) / np.float32(steps - 1)
    half = steps // 2
    out = []
    for i in range(steps):
        if i < half:
            v = s + step * np.float32(i)
        else:
            v = e - step * np.float32(steps - i - 1)
        out.append(float(np.float32(v)))
    return out


def posterize_table(bins: int, div: int) -> list:
    """8 - (torch.arange(bins) / ((bins - 1) / div)).round().int(): float32 division, round half to even."""
    d = np.float32((bins - 1) / div)
    return [float(8 - int(np.round(np.float32(i) / d))) for i in range(bins)]


def space(kind: str, width: int, height: int) -> dict:
    """`_augmentation_space` of TrivialAugmentWide ('wide') or RandAugment ('rand'): op -> 31 magnitudes."""
    if kind == "wide":
        shear, tx, ty, rot, enh, post = 0.99, 32.0, 32.0, 135.0, 0.99, 6
    else:
        shear, rot, enh, post = 0.3, 30.0, 0.9, 4
        tx, ty = 150.0 / 331.0 * width, 150.0 / 331.0 * height
    return {
        "ShearX": linspace_f32(0.0, shear, BINS),
        "ShearY": linspace_f32(0.0, shear, BINS),
        "TranslateX": linspace_f32(0.0, tx, BINS),
        "TranslateY": linspace_f32(0.0, ty, BINS),
        "Rotate": linspace_f32(0.0, rot, BINS),
        "Brightness": linspace_f32(0.0, enh, BINS),
        "Color": linspace_f32(0.0, enh, BINS),
        "Contrast": linspace_f32(0.0, enh, BINS),
        "Sharpness": linspace_f32(0.0, enh, BINS),
        "Posterize": posterize_table(BINS, post),
        "Solarize": linspace_f32(255.0, 0.0, BINS),
    }


# torchvision.transforms.functional._get_inverse_affine_matrix (v0.2x), unchanged.
def _get_inverse_affine_matrix(center, angle, translate, scale, shear, inverted=True):
    rot = math.radians(angle)
    sx = math.radians(shear[0])
    sy = math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix = [x / scale for x in matrix]
    matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty)
    matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty)
    matrix[2] += cx
    matrix[5] += cy
    return matrix


FILL = {"fillcolor": (0, 0, 0)}  # functional_pil._parse_fill(None, rgb image)


def affine(img, angle, translate, scale, shear, center=None):
    """torchvision.transforms.functional.affine on a PIL image, NEAREST, fill 0."""
    width, height = img.size
    if center is None:
        center = [width * 0.5, height * 0.5]
    matrix = _get_inverse_affine_matrix(center, angle, translate, scale, shear)
    return img.transform(img.size, Image.AFFINE, matrix, Image.NEAREST, **FILL)


def apply_op(img, op, magnitude):
    """torchvision.transforms.autoaugment._apply_op, PIL path."""
    if op == "ShearX":
        return affine(img, 0.0, [0, 0], 1.0, [math.degrees(math.atan(magnitude)), 0.0], center=[0, 0])
    if op == "ShearY":
        return affine(img, 0.0, [0, 0], 1.0, [0.0, math.degrees(math.atan(magnitude))], center=[0, 0])
    if op == "TranslateX":
        return affine(img, 0.0, [int(magnitude), 0], 1.0, [0.0, 0.0])
    if op == "TranslateY":
        return affine(img, 0.0, [0, int(magnitude)], 1.0, [0.0, 0.0])
    if op == "Rotate":
        return img.rotate(magnitude, Image.NEAREST, False, None, **FILL)
    if op == "Brightness":
        return ImageEnhance.Brightness(img).enhance(1.0 + magnitude)
    if op == "Color":
        return ImageEnhance.Color(img).enhance(1.0 + magnitude)
    if op == "Contrast":
        return ImageEnhance.Contrast(img).enhance(1.0 + magnitude)
    if op == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(1.0 + magnitude)
    if op == "Posterize":
        return ImageOps.posterize(img, int(magnitude))
    if op == "Solarize":
        return ImageOps.solarize(img, magnitude)
    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    if op == "Identity":
        return img
    raise ValueError(op)


def test_image(width=24, height=20) -> Image.Image:
    """Deterministic RGB pixels with channels of different ranges (so autocontrast and equalize do work)."""
    img = Image.new("RGB", (width, height))
    for y in range(height):
        for x in range(width):
            r = 30 + (7 * x + 5 * y + (x * y) % 13) % 170
            g = (x * x + 3 * y * y + 17) % 256
            b = 100 + ((x ^ y) * 9) % 60
            img.putpixel((x, y), (r, g, b))
    return img


def main():
    main_img = test_image()
    square = main_img.crop((2, 2, 18, 18))
    images = {"main": main_img, "square": square}
    wide = space("wide", *main_img.size)
    rand = space("rand", *main_img.size)

    # (image, op, magnitude as _apply_op receives it: signed)
    cases = [("main", "Identity", 0.0), ("main", "AutoContrast", 0.0), ("main", "Equalize", 0.0)]
    for op in ["ShearX", "ShearY"]:
        cases += [("main", op, wide[op][10]), ("main", op, -wide[op][30]), ("main", op, -rand[op][9])]
    for op in ["TranslateX", "TranslateY"]:
        cases += [("main", op, wide[op][15]), ("main", op, -wide[op][7]), ("main", op, rand[op][9])]
    cases += [
        ("main", "Rotate", wide["Rotate"][3]),
        ("main", "Rotate", -wide["Rotate"][30]),
        ("main", "Rotate", wide["Rotate"][20]),
        ("main", "Rotate", -rand["Rotate"][9]),
        ("square", "Rotate", wide["Rotate"][20]),
        ("square", "Rotate", -wide["Rotate"][20]),
        ("square", "Rotate", 180.0),
        ("square", "Rotate", -wide["Rotate"][7]),
    ]
    for op in ["Brightness", "Color", "Contrast", "Sharpness"]:
        cases += [
            ("main", op, wide[op][20]),
            ("main", op, -wide[op][30]),
            ("main", op, -rand[op][9]),
            ("main", op, wide[op][0]),
        ]
    cases += [("square", "Sharpness", wide["Sharpness"][30])]
    cases += [("main", "Posterize", wide["Posterize"][b]) for b in (28, 12)]
    cases += [("main", "Posterize", rand["Posterize"][9])]
    cases += [("main", "Solarize", wide["Solarize"][b]) for b in (10, 30, 0)]

    out = {
        "about": "torchvision 0.2x _apply_op on PIL images; made by scripts/augment-reference.py with Pillow "
        + Image.__version__,
        "images": {k: {"width": v.size[0], "height": v.size[1], "rgb": hexpix(v)} for k, v in images.items()},
        "tables": {
            "size": list(main_img.size),
            "wide": {k: [bits(x) for x in v] for k, v in wide.items()},
            "rand": {k: [bits(x) for x in v] for k, v in rand.items()},
        },
        "cases": [
            {"image": im, "op": op, "magnitude": bits(m), "rgb": hexpix(apply_op(images[im], op, m))}
            for im, op, m in cases
        ],
    }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
