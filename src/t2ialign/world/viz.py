"""Image grids with captions, for showcases and reports."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw


def labelled_grid(
    images: list[np.ndarray],
    captions: list[str] | None = None,
    cols: int = 6,
    cell: int = 128,
    caption_lines: int = 3,
) -> Image.Image:
    """A grid of images (uint8 HWC), each scaled to ``cell`` pixels with nearest neighbours and
    captioned below in the default bitmap font."""
    n = len(images)
    rows = (n + cols - 1) // cols
    text_h = 12 * caption_lines if captions else 0
    grid = Image.new("RGB", (cols * (cell + 4) + 4, rows * (cell + text_h + 6) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        x, y = 4 + c * (cell + 4), 4 + r * (cell + text_h + 6)
        grid.paste(
            Image.fromarray(np.asarray(img, dtype=np.uint8)).resize((cell, cell), Image.NEAREST), (x, y)
        )
        if captions:
            lines = textwrap.wrap(captions[i], width=max(8, cell // 6))[:caption_lines]
            for j, line in enumerate(lines):
                draw.text((x, y + cell + 1 + 12 * j), line, fill=(0, 0, 0))
    return grid
