"""Pictures that stages write and the report shows: shared here so no stage imports the report."""

from __future__ import annotations

import base64
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


def png_bytes(figure, **kwargs) -> bytes:
    """A matplotlib figure or a PIL image encoded as PNG."""
    buf = io.BytesIO()
    if isinstance(figure, Image.Image):
        figure.save(buf, format="PNG", **kwargs)
    else:
        figure.savefig(buf, format="png", **kwargs)
    return buf.getvalue()


def save_png(figure, path, **kwargs) -> None:
    """Write a matplotlib figure or a PIL image as PNG to ``path`` on any filesystem (storage.py)."""
    from medisyn.records import atomic_write_bytes

    atomic_write_bytes(png_bytes(figure, **kwargs), path)


def data_uri(image: bytes | Image.Image, max_width: int = 1600, max_pixels: int = 6_000_000) -> str:
    """An image (encoded bytes or PIL) as a ``data:`` URI, for a page that must stand alone (mailed, attached).

    Wider than ``max_width`` or larger than ``max_pixels`` (a contact sheet of hundreds of captions) is
    scaled down. Photographs (contact sheets, galleries) go as JPEG, about a sixth of their PNG; charts stay
    PNG, whose text JPEG would blur: JPEG is kept only where it is under half the PNG's size.
    """
    if isinstance(image, Image.Image):
        im, png = image, None
    else:
        im = Image.open(io.BytesIO(image))
        im.load()
        png = image if im.format == "PNG" else None
    if im.mode not in ("L", "RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
    scale = min(1.0, max_width / im.width, (max_pixels / (im.width * im.height)) ** 0.5)
    if scale < 1.0:
        im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))), Image.Resampling.LANCZOS)
        png = None
    png = png or png_bytes(im)
    flat = im
    if im.mode == "RGBA":  # JPEG has no alpha: charts are drawn on white
        flat = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB")
    buf = io.BytesIO()
    flat.save(buf, format="JPEG", quality=85)
    fmt, data = ("jpeg", buf.getvalue()) if len(buf.getvalue()) < len(png) / 2 else ("png", png)
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode('ascii')}"
