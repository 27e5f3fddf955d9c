"""A contact sheet: the query and its results side by side, each result labelled with
rank and score, as one JPEG or PNG."""
from __future__ import annotations

import io

from sparse_embed.pipeline.store import storage

THUMB = 160
LABEL_H = 18


def _thumb(data: bytes | None):
    from PIL import Image, ImageOps

    if data is None:
        return Image.new("RGB", (THUMB, THUMB), (90, 90, 90))
    try:
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        img = img.convert("RGB")
    except Exception:  # an unreadable result still gets its cell
        return Image.new("RGB", (THUMB, THUMB), (120, 0, 0))
    img.thumbnail((THUMB, THUMB))
    cell = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
    cell.paste(img, ((THUMB - img.width) // 2, (THUMB - img.height) // 2))
    return cell


def contact_sheet(query: str, hits, out: str) -> str:
    """Write the sheet for one query (a path or URI) and its hits to `out` (path or URI)."""
    from PIL import Image, ImageDraw

    try:
        query_data = storage.read_bytes(query)
    except Exception:  # a query by image_id whose object is gone still gets its cell
        query_data = None
    cells = [(_thumb(query_data), "query")]
    for h in hits:
        try:
            data = storage.read_bytes(h.uri)
        except Exception:
            data = None
        cells.append((_thumb(data), f"#{h.rank} {h.score:.3f}"))
    sheet = Image.new("RGB", (THUMB * len(cells), THUMB + LABEL_H), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (img, label) in enumerate(cells):
        sheet.paste(img, (i * THUMB, 0))
        draw.text((i * THUMB + 4, THUMB + 3), label, fill=(0, 0, 0))
    buf = io.BytesIO()
    sheet.save(buf, "PNG" if out.lower().endswith(".png") else "JPEG")
    storage.write_bytes_atomic(out, buf.getvalue())
    return out
