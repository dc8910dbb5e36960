"""Image bytes -> uint8 training crop, in CPU data workers (the cascade maths runs on the device)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


class DecodeError(ValueError):
    """An image that cannot be decoded; the reader skips it and counts it."""


def decode_crop(data: bytes, resolution: int, rng: np.random.Generator, flip: bool = True) -> np.ndarray:
    """Decode, resize the shorter side to `resolution` (bicubic), random square crop, random h-flip.

    Returns a (3, resolution, resolution) uint8 array.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (resolution, resolution))  # JPEG DCT scaling when the file is much larger
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DecodeError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    width, height = image.size
    scale = resolution / min(width, height)
    if scale != 1.0:
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    left = int(rng.integers(0, image.width - resolution + 1))
    top = int(rng.integers(0, image.height - resolution + 1))
    pixels = np.asarray(image)[top : top + resolution, left : left + resolution]
    if flip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
