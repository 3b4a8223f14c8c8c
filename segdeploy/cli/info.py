"""`segdeploy info`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from segdeploy.cli.app import app, emit_json, guarded


@app.command("info")
@guarded
def info_cmd(
    target: Path = typer.Argument(..., help="A run directory, or an exported .onnx / .engine file."),
    json_out: Path = typer.Option(None, "--json", help="Write the description as JSON ('-' for stdout)."),
) -> None:
    """What a run or model is: status, epochs, best metrics, exports with their gate results.

    Also each export's staleness and size, the data and splits it came from, the evaluations on
    disk and the versions that made it."""
    from segdeploy.info import describe

    from rich.console import Console

    facts = describe(target)
    if json_out is None or str(json_out) != "-":  # the description is this verb's output: stdout
        out = Console(highlight=False)  # the terminal's width, or COLUMNS when piped
        for line in (run_lines(facts) if facts["kind"] == "run" else model_lines(facts)):
            out.print(line, soft_wrap=True)
        if facts["kind"] == "run":
            out.print(exports_table(facts["exports"]))
    emit_json(facts, json_out)


def _model_line(m: dict[str, Any] | None) -> str:
    if not m:
        return "model     -"
    names = ", ".join(m["classes"][:8]) + (" …" if len(m["classes"]) > 8 else "")
    return (f"model     {m['arch']} {m['encoder']} · {len(m['classes'])} classes ({names}) · {m['bands']} bands "
            f"{m['input_dtype'] or '?'} · tile {m['tile_size']} (multiple of {m['input_divisor']})")


def run_lines(f: dict[str, Any]) -> list[str]:
    """The rich-markup lines `segdeploy info` prints for a run directory (`info.describe_run`'s facts)."""
    status = f["status"] + (f" ({f['error']})" if f.get("error") else "")
    lines = [f"[bold]{escape(f['path'])}[/] · {escape(status)} · {f['epochs_done']}/{f['epochs_planned']} epochs"]
    best = f.get("best")
    if best:
        lines.append(f"best      val mIoU {best['val_miou']:.4f} at epoch {best['epoch']}"
                     + (f" · stopped early: {f['stopped_early']}" if f.get("stopped_early") else ""))
    lines.append(escape(_model_line(f.get("model"))))
    imported = f.get("imported_from")
    if imported:  # `segdeploy import`: the run holds a model trained elsewhere
        lines.append(escape(f"imported  {imported.get('source', imported.get('file'))} ({imported.get('format')}, sha256 "
                            f"{imported.get('sha256', '')[:12]}…) · held as {f.get('model_format')}"))
    r = f.get("recipe") or {}
    splits = " / ".join(f"{k} {v}" for k, v in f["splits"].items())
    lines.append(escape(f"data      {r.get('data_root')} · {splits} · recipe {r.get('name')} · seed {r.get('seed')}"
                        f"{' · deterministic' if r.get('deterministic') else ''}"))
    for e in f["evaluations"]:
        lines.append(escape(f"eval      {e['split']}: mIoU {e['miou']:.4f} on {e['images']} images ({e['backend']}) "
                            f"→ {e['dir']}"))
    if f.get("nondeterministic_ops"):
        lines.append(f"note      ran without a deterministic implementation: {', '.join(f['nondeterministic_ops'])}")
    versions = " · ".join(f"{k} {v}" for k, v in (f.get("versions") or {}).items())
    lines.append(escape(f"versions  {versions}"))
    if f.get("next"):
        lines.append(escape(f"next      {f['next']}"))
    return lines


def model_lines(f: dict[str, Any]) -> list[str]:
    """The rich-markup lines `segdeploy info` prints for an ONNX file or engine (`info.describe`'s facts)."""
    lines = [f"[bold]{escape(f['path'])}[/] · {f['backend']} {f['precision']} · {f['size_mb']:.1f} MB",
             escape(_model_line(f["model"]))]
    src = f.get("source")
    lines.append(escape(f"source    {src['path'] if src else 'none recorded'}"
                        f" · {'STALE: ' + f['stale'] if f.get('stale') else 'current'}"))
    if f.get("gate"):
        lines.append(escape(f"gate      {_gate_text(f['gate'])}"))
    lines.append(escape("versions  " + " · ".join(f"{k} {v}" for k, v in (f.get("versions") or {}).items())))
    return lines


def _gate_text(g: dict[str, Any] | None) -> str:
    if not g:
        return "no record"
    text = ("pass" if g.get("passed") else "FAIL") + (f", agreement {g['agreement']:.3%}" if g.get("agreement") else "")
    if g.get("worst_class_iou_drop_points") is not None:
        text += f", worst class −{max(g['worst_class_iou_drop_points'], 0):.2f} pt"
    if g.get("reduced_flops_share") is not None:
        text += f", {g['reduced_flops_share']:.0%} of FLOPs reduced"
    return text


def exports_table(rows: list[dict[str, Any]]) -> Table:
    """A rich Table of a run's export forms: file, size (MB), gate verdict and staleness, or how to make a missing
    one."""
    t = Table(title="exports", title_justify="left")
    for col in ("form", "file", "size MB", "gate", "state"):
        t.add_column(col, justify="right" if col == "size MB" else "left", overflow="fold")
    for r in rows:
        if not r["present"]:
            t.add_row(r["form"], "-", "-", "-", escape(f"not made: {r['make_with']}"))
            continue
        state = f"[red]stale[/]: {escape(r['stale'])}" if r.get("stale") else "current"
        t.add_row(r["form"], escape(r["file"]), f"{r['size_mb']:.1f}", escape(_gate_text(r.get("gate"))), state)
    return t
