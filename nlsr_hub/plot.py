"""A small similarity heat map of a plan as PNG bytes, with no plotting dependency and byte-deterministic.

Rows are blocks, columns module types; a cell's colour runs from red (similarity ≤ low) to green (1.0), and
patched modules carry a black frame. Used by the model card; the Space draws its own interactive version.
"""

from __future__ import annotations

import struct
import zlib

from .adapters import block_order
from .plan import RealignmentPlan

CELL = 18
FRAME = 2


def _png(width: int, height: int, rows: list[bytes]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _colour(value: float, low: float) -> tuple[int, int, int]:
    t = 0.0 if value <= low else min(1.0, (value - low) / (1.0 - low)) if low < 1.0 else 1.0
    return round(215 * (1 - t) + 40 * t), round(48 * (1 - t) + 170 * t), round(39 * (1 - t) + 80 * t)


def layout(plan: RealignmentPlan) -> tuple[list[int | None], list[str]]:
    """The heat map's row labels (blocks, modules outside blocks last) and column labels (module types)."""
    blocks = sorted({m.block for m in plan.modules}, key=block_order)
    types = sorted({m.module_type for m in plan.modules})
    return blocks, types


def similarity_heatmap_png(plan: RealignmentPlan, *, low: float | None = None) -> bytes:
    """PNG bytes of the blocks × module types similarity map of `plan` (patched cells framed in black)."""
    blocks, types = layout(plan)
    cells = {(m.block, m.module_type): m for m in plan.modules}
    if low is None:
        low = min((m.similarity for m in plan.modules), default=0.0)
        low = min(low, 0.999)
    width, height = len(types) * CELL, len(blocks) * CELL
    white = (255, 255, 255)
    grid = [[white] * width for _ in range(height)]
    for r, block in enumerate(blocks):
        for c, kind in enumerate(types):
            module = cells.get((block, kind))
            if module is None:
                continue
            fill = _colour(module.similarity, low)
            for y in range(r * CELL, (r + 1) * CELL):
                for x in range(c * CELL, (c + 1) * CELL):
                    edge = min(y - r * CELL, (r + 1) * CELL - 1 - y, x - c * CELL, (c + 1) * CELL - 1 - x)
                    if edge == 0:
                        grid[y][x] = white
                    elif module.patched and edge <= FRAME:
                        grid[y][x] = (0, 0, 0)
                    else:
                        grid[y][x] = fill
    rows = [bytes(channel for pixel in row for channel in pixel) for row in grid]
    return _png(width, height, rows)
