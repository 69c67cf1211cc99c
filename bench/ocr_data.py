"""Rendered text images for the PP-OCR models: real English lines (the standard library's
docstrings, bench/text_data.py) drawn with Pillow's built-in scalable font, preprocessed the way
PaddleOCR does for each model. Calibration and evaluation images use different sentences.

- rec (ch_PP-OCRv4_rec): one line, height 48, width scaled to fit 320 and padded; (x/255 - 0.5) / 0.5.
- cls (ch_ppocr_mobile_v2.0_cls): one line in 48 x 192, every other image turned 180 degrees.
- det (ch_PP-OCRv4_det): a page of 8 to 14 lines at random positions and sizes, resized to
  `det_side` square; ImageNet mean and std.

    python bench/ocr_data.py --out DIR     # DIR/{rec,cls,det}/{calibration,evaluation}/*.npz
"""
import argparse
import random
from pathlib import Path

import numpy as np

import text_data

MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def _font(size):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font, no system fonts


def _line(text: str, height: int, rng: random.Random):
    """A text line image (RGB uint8 array) of the given height, width as the text needs."""
    from PIL import Image, ImageDraw

    size = int(height * rng.uniform(0.6, 0.8))
    font = _font(size)
    box = font.getbbox(text)
    w = box[2] - box[0] + 8
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    fg = tuple(rng.randint(0, 70) for _ in range(3))
    img = Image.new("RGB", (w, height), bg)
    ImageDraw.Draw(img).text((4 - box[0], (height - (box[3] - box[1])) // 2 - box[1]), text, fill=fg, font=font)
    return img


def rec_sample(text: str, rng: random.Random, width: int = 320, height: int = 48) -> np.ndarray:
    from PIL import Image

    img = _line(text, height, rng)
    w = min(width, max(1, round(img.width * height / img.height)))
    img = img.resize((w, height), Image.BILINEAR)
    x = (np.asarray(img, np.float32) / 255.0 - 0.5) / 0.5
    out = np.zeros((height, width, 3), np.float32)
    out[:, :w] = x
    return out.transpose(2, 0, 1)[None]


def cls_sample(text: str, rng: random.Random, flip: bool) -> np.ndarray:
    x = rec_sample(text[:24], rng, 192, 48)
    return x[:, :, ::-1, ::-1].copy() if flip else x


def det_sample(texts: list[str], rng: random.Random, side: int) -> np.ndarray:
    from PIL import Image

    page = Image.new("RGB", (960, 960), tuple(rng.randint(215, 255) for _ in range(3)))
    y = rng.randint(10, 40)
    for text in texts:
        line = _line(text[:rng.randint(20, 60)], rng.randint(24, 56), rng)
        if y + line.height > page.height - 10:
            break
        page.paste(line, (rng.randint(10, max(10, page.width - line.width - 10)), y))
        y += line.height + rng.randint(8, 40)
    page = page.resize((side, side), Image.BILINEAR)
    x = (np.asarray(page, np.float32) / 255.0 - MEAN) / STD
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def make(kind: str, sentences: list[str], count: int, seed: int, det_side: int = 640) -> list[dict]:
    rng = random.Random(seed)
    if kind == "rec":  # a line as a detector would crop it: a few words
        return [{"x": rec_sample(s[:rng.randint(12, 36)].strip(), rng)} for s in sentences[:count]]
    if kind == "cls":
        return [{"x": cls_sample(s, rng, i % 2 == 1)} for i, s in enumerate(sentences[:count])]
    pages, k = [], 0
    for _ in range(count):
        n = rng.randint(8, 14)
        pages.append({"x": det_sample(sentences[k:k + n], rng, det_side)})
        k += n
    return pages


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--evaluation", type=int, default=64)
    args = ap.parse_args()
    cal, ev = text_data.split(1500, 1500)
    for kind in ("rec", "cls", "det"):
        for part, sentences, n, seed in (("calibration", cal, args.calibration, 1),
                                         ("evaluation", ev, args.evaluation, 2)):
            text_data.write_folder(make(kind, sentences, n, seed), args.out / kind / part)


if __name__ == "__main__":
    main()
