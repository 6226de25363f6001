"""A small similarity heat map of a plan as PNG bytes, with no plotting dependency and byte-deterministic.

Rows are blocks, columns module types; a cell's colour runs from red (similarity ≤ low) to green (1.0), and
patched modules carry a black frame. Used by the model card; the Space draws its own interactive version.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

from .adapters import block_order
from .plan import RealignmentPlan

CELL = 18
FRAME = 2
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


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


def _cell_pattern(patched: bool) -> list[tuple[tuple[str, int], ...]]:
    """Each pixel row of a cell as runs of ``(kind, length)``: ``edge`` (the white border between cells), ``frame``
    (black, patched cells only) or ``fill`` (the similarity colour)."""
    pattern = []
    for y in range(CELL):
        runs: list[list[Any]] = []
        for x in range(CELL):
            edge = min(y, CELL - 1 - y, x, CELL - 1 - x)
            kind = "edge" if edge == 0 else "frame" if patched and edge <= FRAME else "fill"
            if runs and runs[-1][0] == kind:
                runs[-1][1] += 1
            else:
                runs.append([kind, 1])
        pattern.append(tuple((kind, length) for kind, length in runs))
    return pattern


def _cell_rows(pattern: list[tuple[tuple[str, int], ...]], fill: tuple[int, int, int]) -> list[bytes]:
    """The RGB bytes of a cell's pixel rows (`pattern` from `_cell_pattern`)."""
    colours = {"edge": bytes(WHITE), "frame": bytes(BLACK), "fill": bytes(fill)}
    return [b"".join(colours[kind] * length for kind, length in runs) for runs in pattern]


def similarity_heatmap_png(plan: RealignmentPlan, *, low: float | None = None) -> bytes:
    """PNG bytes of the blocks × module types similarity map of `plan` (patched cells framed in black). Built a
    cell row at a time (runs of one colour), not pixel by pixel."""
    blocks, types = layout(plan)
    cells = {(m.block, m.module_type): m for m in plan.modules}
    if low is None:
        low = min((m.similarity for m in plan.modules), default=0.0)
        low = min(low, 0.999)
    patterns = {patched: _cell_pattern(patched) for patched in (False, True)}
    empty = [bytes(WHITE) * CELL] * CELL
    rows: list[bytes] = []
    for block in blocks:
        strips = []
        for kind in types:
            module = cells.get((block, kind))
            strips.append(empty if module is None
                          else _cell_rows(patterns[module.patched], _colour(module.similarity, low)))
        rows.extend(b"".join(strip[y] for strip in strips) for y in range(CELL))
    return _png(len(types) * CELL, len(blocks) * CELL, rows)
