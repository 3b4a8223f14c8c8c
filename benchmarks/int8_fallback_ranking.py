"""Which nodes should the INT8 fallback keep in float? Two rankings compared on one exported run.

For the CPU form (U8S8) of RUN/export/model.onnx: argmax agreement with the FP32 ONNX on the
gate's validation tiles when the top k nodes of each ranking are kept in float —
(a) each node's own relative error (its output error minus its inputs', the ranking export used
before), (b) its measured effect on the logits when it alone is quantised
(`segdeploy.export.sensitivity`) — over three candidate sets: every node quantize_static
quantizes, those less Relu/Clip (what export uses), and the compute nodes only.

    python benchmarks/int8_fallback_ranking.py RUN --out benchmarks/results/int8_fallback_ranking.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def local_errors(fp32, fp16, batches: list[np.ndarray]) -> dict[str, float]:  # noqa: ANN001
    """The ranking compared here (it lived in export/fp16.py; the pipeline ranks with sensitivity.py).
    For each node of the FP32 graph: the relative FP16 error it adds beyond what its inputs carry."""
    from segdeploy.export.fp16 import run_all

    ref = run_all(fp32, batches)
    got = run_all(fp16, batches)

    def rel_err(name: str) -> float:
        errs = []
        for r, g in zip(ref, got, strict=True):
            if name in r and name in g:
                a, b = r[name].astype(np.float32), g[name].astype(np.float32)
                scale = float(np.abs(a).mean()) + 1e-6
                errs.append(float(np.abs(a - b).mean()) / scale)
        return max(errs) if errs else 0.0

    cache: dict[str, float] = {}

    def err(name: str) -> float:
        if name not in cache:
            cache[name] = rel_err(name)
        return cache[name]

    out: dict[str, float] = {}
    for node in fp32.graph.node:
        produced = max((err(o) for o in node.output if o), default=0.0)
        inherited = max((err(i) for i in node.input if i), default=0.0)
        out[node.name] = max(produced - inherited, 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--calib", type=int, default=8, help="calibration tiles (training split)")
    ap.add_argument("--tiles", type=int, default=16, help="validation tiles the agreement is measured on")
    ap.add_argument("--ks", default="3,6,12,24")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = measure(args.run, args.calib, args.tiles, [int(k) for k in args.ks.split(",")])
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def measure(run_dir: Path, n_calib: int, n_tiles: int, ks: list[int]) -> dict:
    import onnx
    import onnxruntime as ort

    from segdeploy.artifact import Run
    from segdeploy.export import int8, sensitivity
    from segdeploy.parity import as_numpy_batches, parity_tiles

    run = Run(run_dir)
    meta, src = run.meta, run.export_path("fp32")
    calib = as_numpy_batches(parity_tiles(run.recipe, meta, meta.tile_size, n_calib, "train")[0], 4)
    val_x, val_y = parity_tiles(run.recipe, meta, meta.tile_size, n_tiles, "val")

    def labels(path: Path) -> np.ndarray:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        return np.concatenate([s.run(None, {name: b})[0] for b in as_numpy_batches(val_x, 4)]).argmax(1)

    ref, valid = labels(src), val_y.numpy() != meta.ignore_index
    out: dict = {"run": str(run_dir), "model": f"{meta.arch} {meta.encoder}", "tile": meta.tile_size,
                 "calibration_tiles": n_calib, "validation_tiles": len(val_x)}
    with tempfile.TemporaryDirectory() as d:
        prepared, cache, q = Path(d) / "prepared.onnx", Path(d) / "calibration.json", Path(d) / "q.onnx"
        int8.prepare(src, prepared)
        int8.quantize(prepared, q, calib, "cpu", "minmax", [], cache)
        agreement = lambda: float((labels(q) == ref)[valid].mean())  # noqa: E731
        out["all_int8_agreement"] = agreement()
        proto = onnx.load(str(prepared))
        ops = {n.name: n.op_type for n in proto.graph.node}
        own = local_errors(proto, onnx.load(str(q)), calib[:2])
        everything = [n for n in ops if n in set(int8.quantizable_nodes(proto)) or ops[n] in int8.REMOVABLE_ACTIVATIONS]
        sets = {"quantized": everything, "quantized_less_relu_clip": int8.quantizable_nodes(proto),
                "compute": sorted(int8.compute_nodes(proto))}
        for set_name, cands in sets.items():
            t0 = time.perf_counter()
            effect = sensitivity.output_effects(proto, cands, sensitivity.Int8Quantization(
                sensitivity.calibrated_ranges(cache), symmetric=False), [calib[0][:2]])
            row = {"candidates": len(cands), "effect_seconds": round(time.perf_counter() - t0, 1)}
            for rank_name, score in (("own_error", own), ("measured_effect", effect)):
                ranked = sorted(cands, key=lambda n: -score.get(n, 0.0))
                for k in ks:
                    int8.quantize(prepared, q, calib, "cpu", "minmax", ranked[:k], cache)
                    row[f"{rank_name}_top{k}"] = agreement()
            out[set_name] = row
    return out


if __name__ == "__main__":
    main()
