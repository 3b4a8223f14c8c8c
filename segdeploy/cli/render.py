"""Rich renderings shared by verbs."""

from __future__ import annotations

import math

from rich.table import Table

from segdeploy.metrics import SegMetrics


def fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def metrics_table(m: SegMetrics, title: str) -> Table:
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
