"""Pictures that stages write and the report shows: shared here so no stage imports the report."""

from __future__ import annotations

import io
from collections import defaultdict

from PIL import Image, ImageDraw


def contact_sheet(samples: list[tuple[bytes, str]], per_row: int = 4, tile: int = 160) -> Image.Image:
    """Tiles in rows of one caption each, the caption written above its row.

    ``samples`` are (encoded image bytes, caption) pairs; at most ``per_row`` images per caption
    are shown, in the order given.
    """
    by_caption: dict[str, list[bytes]] = defaultdict(list)
    for img, cap in samples:
        by_caption[cap].append(img)
    label_h = 18
    sheet = Image.new("RGB", (per_row * tile, len(by_caption) * (tile + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (cap, imgs) in enumerate(by_caption.items()):
        y = r * (tile + label_h)
        draw.text((4, y + 3), cap[: 7 * per_row * tile // 40], fill="black")
        for c, data in enumerate(imgs[:per_row]):
            im = Image.open(io.BytesIO(data)).convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS)
            sheet.paste(im, (c * tile, y + label_h))
    return sheet


def save_png(figure, path, **kwargs) -> None:
    """Write a matplotlib figure or a PIL image as PNG to ``path`` on any filesystem (storage.py)."""
    from medisyn.records import atomic_write_bytes

    buf = io.BytesIO()
    if isinstance(figure, Image.Image):
        figure.save(buf, format="PNG", **kwargs)
    else:
        figure.savefig(buf, format="png", **kwargs)
    atomic_write_bytes(buf.getvalue(), path)
