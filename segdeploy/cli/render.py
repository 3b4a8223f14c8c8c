"""Rich renderings shared by verbs."""

from __future__ import annotations

import math

from rich.table import Table

from segdeploy.metrics import SegMetrics


def fmt(v: float | None, digits: int = 4) -> str:
    """`v` with `digits` decimals, '-' for None or NaN (a value that could not be measured)."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def metrics_table(m: SegMetrics, title: str) -> Table:
    """A rich Table of per-class IoU, Dice, precision, recall, F1 and pixel counts with the means, titled `title`; the
    caption gives pixel accuracy and any hierarchy levels' mIoU."""
    t = Table(title=title, title_justify="left")
    for col in ("class", "IoU", "Dice", "precision", "recall", "F1", "pixels"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for row in m.per_class():
        t.add_row(str(row["class"]), fmt(row["iou"]), fmt(row["dice"]), fmt(row["precision"]), fmt(row["recall"]),
                  fmt(row["f1"]), f"{row['support']:,}")
    t.add_section()
    t.add_row("[bold]mean", f"[bold]{fmt(m.miou)}", f"[bold]{fmt(m.mdice)}", "", "", "", "")
    t.caption = f"pixel accuracy {fmt(m.pixel_accuracy)}" + "".join(
        f" · {k} mIoU {fmt(v)}" for k, v in m.levels.items()
    )
    return t


def short_names(paths: list[str]) -> list[str]:
    """The shortest path suffixes that still tell every item apart: runs/a/unet and
    runs/b/unet become a/unet and b/unet; a lone runs/demo becomes demo. Never cut with '…'."""
    parts = [[p for p in str(path).replace("\\", "/").split("/") if p] or [str(path)] for path in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _cells(text: str) -> int:
    from rich.text import Text

    return Text.from_markup(text).cell_len


def folded_tables(title: str, keys: list[str], columns: list[tuple[str, list[str]]], width: int,
                  key_header: str = "", caption: str = "") -> list[Table]:
    """One table when it fits `width`, else several that repeat the key column and share the value
    columns out: no line wider than `width`, and the key column (what tells rows apart) is never cut."""
    key_w = max([_cells(key_header), *map(_cells, keys)]) + 3
    groups: list[list[tuple[str, list[str]]]] = [[]]
    used = key_w + 1
    for header, values in columns:
        w = max([_cells(header), *map(_cells, values)]) + 3
        if groups[-1] and used + w > width:
            groups.append([])
            used = key_w + 1
        groups[-1].append((header, values))
        used += w
    tables = []
    for i, group in enumerate(groups):
        t = Table(title=title if i == 0 else None, title_justify="left")
        t.add_column(key_header, no_wrap=True)
        for header, _ in group:
            t.add_column(header, justify="right", no_wrap=True)
        for r, key in enumerate(keys):
            t.add_row(key, *[values[r] for _, values in group])
        tables.append(t)
    if caption:
        tables[-1].caption, tables[-1].caption_justify = caption, "left"
    return tables
