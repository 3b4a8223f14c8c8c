"""Polygons from predict (`--vector`): streamed band by band, merged across seams, and equal to
polygonising the whole class raster at once — checked against rasterio's own `features.shapes`
and by rasterising the written polygons back onto the input grid."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.features import rasterize, shapes

from segdeploy.errors import BackendUnavailable, UserError
from segdeploy.predict import PredictOptions, predict_file
from tests.test_predict import EchoBackend, write_tif

pyogrio = pytest.importorskip("pyogrio", reason="--vector needs segdeploy[vector] (in [dev]): pip install -e '.[dev]'")
shapely = pytest.importorskip("shapely")

from segdeploy.vector import Regions, SeamPolygonizer, VectorOptions  # noqa: E402

TILE, OVERLAP = 32, 8
STRIDE = TILE - OVERLAP  # predict hands finished rows over in bands of this height
PIXEL = 10.0  # write_tif's pixel size (m)


def shapes_scene() -> np.ndarray:
    """216×150 classes 1-4 (0: nodata) drawn to cross the 24-row bands: a background region
    spanning every band with many holes, a ring whose hole spans seven bands (with a nodata hole
    of its own), a U whose arms meet four bands below their tops, an inverted U that splits, a
    staircase of single pixels touching only diagonally across seams, a checkerboard straddling a
    seam, a hole touching its ring at one corner, and noise."""
    lab = np.full((216, 150), 1, np.uint8)
    lab[10:190, 10:60] = 2
    lab[30:170, 25:45] = 3
    lab[80:100, 30:40] = 0
    lab[20:160, 70:76] = 4
    lab[20:160, 90:96] = 4
    lab[150:160, 70:96] = 4
    lab[40:50, 105:140] = 2
    lab[50:200, 105:110] = 2
    lab[50:200, 135:140] = 2
    for y in range(60, 125):
        lab[y, 112 + (y - 60) % 20] = 3
    lab[44:52, 60:68] = np.indices((8, 8)).sum(0) % 2 * 2 + 1  # 1/3 checkerboard across the seam at row 48
    lab[70:73, 78:81] = [[4, 4, 4], [4, 1, 4], [4, 4, 1]]  # the hole meets the outline at a corner on seam 72
    lab[140:150, 0:8] = 0
    noise = np.random.default_rng(3).integers(0, 5, (36, 50)).astype(np.uint8)
    lab[180:216, 100:150] = noise
    return lab


def read_features(path: Path, layer: str | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    _, _, wkb, values = pyogrio.raw.read(path, layer=layer)
    info = pyogrio.read_info(path, layer=layer)
    return shapely.from_wkb(wkb), dict(zip(info["fields"].tolist(), values))


def whole_raster_polygons(labels: np.ndarray, nodata: int, transform=None) -> list[tuple[int, bytes]]:  # noqa: ANN001
    """The reference: rasterio's features.shapes over the whole raster (4-connectivity, its default)."""
    kw = {"transform": transform} if transform is not None else {}
    return sorted((int(v), shapely.normalize(shapely.geometry.shape(g)).wkb)
                  for g, v in shapes(labels, mask=labels != nodata, **kw))


def as_set(geoms: np.ndarray, classes: np.ndarray) -> list[tuple[int, bytes]]:
    return sorted((int(c), shapely.normalize(g).wkb) for g, c in zip(geoms, classes))


# ------------------------------------------------------------------------------ the merge itself


@settings(max_examples=80, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 30), classes=st.integers(1, 4), nodata=st.floats(0, 0.3),
       blobs=st.booleans(), cuts=st.lists(st.integers(1, 39), max_size=8), seed=st.integers(0, 10_000))
def test_bands_merged_across_seams_equal_the_whole_raster_polygonised(h: int, w: int, classes: int, nodata: float,
                                                                       blobs: bool, cuts: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    if blobs:  # large shapes with holes; else noise: diagonal touches everywhere
        yy, xx = np.mgrid[:h, :w]
        lab = ((np.sin(yy / rng.uniform(1, 6)) + np.cos(xx / rng.uniform(1, 6))) * 2).astype(int) % classes
    else:
        lab = rng.integers(0, classes, (h, w))
    lab = lab.astype(np.uint8)
    lab[rng.random((h, w)) < nodata] = 255
    edges = sorted({0, *[c for c in cuts if c < h], h})
    poly = SeamPolygonizer(w, np.arange(256) != 255)
    batches = [poly.add_band(y0, lab[y0:y1]) for y0, y1 in zip(edges, edges[1:])]
    regions = Regions.concat([*batches, poly.finish()])
    assert not poly.open
    geoms = regions.geometries
    assert shapely.is_valid(geoms).all() and set(shapely.get_type_id(geoms).tolist()) <= {3}  # Polygons only
    assert as_set(geoms, regions.class_ids) == whole_raster_polygons(lab, 255)
    assert regions.pixels.tolist() == np.rint(shapely.area(geoms)).astype(int).tolist()


# ------------------------------------------------------------------------------ through predict


class ConfidenceEcho(EchoBackend):
    """Band 0 is the class; band 1 scales the logits, so the confidence varies from pixel to pixel."""

    def __init__(self) -> None:
        super().__init__(5, TILE, bands=2)

    def run(self, batch: np.ndarray) -> np.ndarray:
        labels = np.clip(np.round(batch[:, 0]), 0, 4).astype(np.int64)
        return np.moveaxis(np.eye(5, dtype=np.float32)[labels], -1, 1) * (0.2 + batch[:, 1:2])


def confidence_scene(tmp_path: Path, repeat: int = 1) -> tuple[Path, np.ndarray]:
    lab = np.vstack([shapes_scene()] * repeat)
    scale = np.random.default_rng(4).uniform(0, 3, lab.shape).astype(np.float32)
    path = tmp_path / "in.tif"
    write_tif(path, np.stack([lab.astype(np.float32), scale]), nodata=0)
    return path, lab


def vector_formats() -> list:
    params = []
    for fmt in ("gpkg", "geojson", "fgb", "parquet"):
        marks = []
        if fmt == "parquet" and "Parquet" not in pyogrio.list_drivers(write=True):
            marks = [pytest.mark.skip(reason=f"pyogrio's GDAL {pyogrio.__gdal_version_string__} has no Parquet driver "
                                             "(the refusal is tested below)")]
        params.append(pytest.param(fmt, marks=marks))
    return params


@pytest.mark.parametrize("fmt", vector_formats())
def test_polygons_rasterise_back_to_the_class_raster_in_every_format(tmp_path: Path, fmt: str) -> None:
    src, lab = confidence_scene(tmp_path)
    res = predict_file(ConfidenceEcho(), src, tmp_path / "out.tif",
                       PredictOptions(tile=TILE, overlap=OVERLAP, batch=3, probs=True, preview=False,
                                      vector=VectorOptions(fmt)))
    vec = tmp_path / f"out.{fmt}"
    assert res.files[-1] == str(vec) and not list(tmp_path.glob(".*"))  # no partial files left
    with rasterio.open(tmp_path / "out.tif") as out, rasterio.open(tmp_path / "out.probs.tif") as pr:
        pred, transform, crs, conf = out.read(1), out.transform, out.crs, pr.read(1)
    assert np.array_equal(pred[lab != 0], lab[lab != 0])  # the echo model: predictions are the labels
    geoms, fields = read_features(vec)
    assert pyogrio.read_info(vec)["crs"] == crs.to_string() == "EPSG:32633"
    assert shapely.is_valid(geoms).all()
    back = rasterize(zip(geoms, fields["class_id"].tolist()), out_shape=pred.shape, transform=transform, fill=255,
                     dtype="uint8")
    assert np.array_equal(back, pred)  # every pixel once, nodata in none
    # the very polygons GDAL gives for the whole raster at once (same vertices, in map coordinates)
    assert as_set(geoms, fields["class_id"]) == whole_raster_polygons(pred, 255, transform)
    heights = shapely.bounds(geoms)[:, 1] - shapely.bounds(geoms)[:, 3]  # map y runs up: -height
    assert (-heights / PIXEL > 4 * STRIDE).sum() >= 4  # the scene does cross many seams
    assert_no_same_class_polygons_share_an_edge(geoms, fields["class_id"])
    # attributes: exact pixel counts and areas, names, mean confidence of the confidence raster
    index = rasterize(zip(geoms, range(len(geoms))), out_shape=pred.shape, transform=transform, fill=-1, dtype="int32")
    counts = np.bincount(index[index >= 0], minlength=len(geoms))
    assert np.array_equal(fields["pixels"], counts)
    np.testing.assert_allclose(fields["area"], counts * PIXEL**2, rtol=1e-12)
    assert fields["class_name"].tolist() == [f"c{c}" for c in fields["class_id"]]
    mean_conf = np.bincount(index[index >= 0], weights=conf[index >= 0], minlength=len(geoms)) / counts / 100
    np.testing.assert_allclose(fields["confidence"], mean_conf, rtol=1e-9)
    assert 0.2 < fields["confidence"].min() < 0.5 < 0.8 < fields["confidence"].max() <= 1.0  # it varies


def assert_no_same_class_polygons_share_an_edge(geoms: np.ndarray, classes: np.ndarray, corners: bool = True) -> None:
    """Two polygons of one class may meet at a corner (4-connectivity; `corners`: some do), never
    along an edge."""
    tree = shapely.STRtree(geoms)
    a, b = tree.query(geoms, predicate="intersects")
    pairs = (a < b) & (classes[a] == classes[b])
    meet = shapely.intersection(geoms[a[pairs]], geoms[b[pairs]])
    assert (pairs.sum() > 0) == corners and (shapely.get_dimensions(meet) <= 0).all()


def test_a_picture_gives_polygons_in_pixel_coordinates_and_says_so(tmp_path: Path) -> None:
    from PIL import Image

    labels = shapes_scene()[:40, :50] % 3
    Image.fromarray(labels).save(tmp_path / "x.png")
    res = predict_file(EchoBackend(3, TILE), tmp_path / "x.png", tmp_path / "x_pred.png",
                       PredictOptions(tile=TILE, overlap=OVERLAP, vector=VectorOptions("geojson")))
    assert res.files[-1] == str(tmp_path / "x_pred.geojson")
    assert any("x_pred.geojson: polygons in pixel coordinates" in n and "longitude" in n for n in res.notes)
    geoms, fields = read_features(tmp_path / "x_pred.geojson")
    assert np.array_equal(rasterize(zip(geoms, fields["class_id"].tolist()), out_shape=labels.shape), labels)


def test_resume_rebuilds_the_open_polygons_and_gives_the_same_features(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = confidence_scene(tmp_path, repeat=3)  # 648 rows: the raster is on disk by 256-row blocks
    monkeypatch.setattr("segdeploy.vector.POLYGONISE_PIXELS", 1)  # 112-row bands polygonised in 64 + 48 rows
    opts = PredictOptions(tile=128, overlap=16, batch=3, probs=True, preview=False,
                          vector=VectorOptions("gpkg", classes=["c1", "c2", "c4"]))
    predict_file(ConfidenceEcho(), src, tmp_path / "ref.tif", opts)

    def interrupt(done: int, total: int, pixels: int) -> None:
        if done >= 2 * total // 3:
            raise KeyboardInterrupt

    out = tmp_path / "out.tif"
    with pytest.raises(KeyboardInterrupt):
        predict_file(ConfidenceEcho(), src, out, opts, progress=interrupt)
    assert not (tmp_path / "out.gpkg").exists() and (tmp_path / ".out.partial.gpkg").exists()
    assert not [t for t in threading.enumerate() if t.name == "segdeploy-vector"]  # the polygonising thread stopped
    state = json.loads((tmp_path / "out.tif.partial.json").read_text())
    assert state["rows_on_disk"] >= 2 * 112  # bands are rebuilt from disk, not predicted again
    opts.resume = True
    res = predict_file(ConfidenceEcho(), src, out, opts)
    assert res.resumed_from_row == state["rows_on_disk"]
    ref_geoms, ref = read_features(tmp_path / "ref.gpkg", "ref")
    geoms, got = read_features(tmp_path / "out.gpkg", "out")
    assert shapely.to_wkb(geoms).tolist() == shapely.to_wkb(ref_geoms).tolist()  # same features, same order
    for name in ref:
        assert np.array_equal(got[name], ref[name]), name
    assert set(ref["class_id"].tolist()) == {1, 2, 4}


def test_classes_min_area_and_one_layer_per_class(tmp_path: Path) -> None:
    lab = shapes_scene()
    write_tif(tmp_path / "in.tif", lab, nodata=0)
    with rasterio.open(tmp_path / "in.tif") as src:
        transform = src.transform
    reference = whole_raster_polygons(np.where(lab == 0, 255, lab).astype(np.uint8), 255, transform)
    big = [(c, g) for c, g in reference if shapely.from_wkb(g).area >= 30 * PIXEL**2 and c in (2, 3)]
    for min_area in ("30px", "3000"):  # 30 pixels of 10 m × 10 m
        vec = VectorOptions(str(tmp_path / f"v{min_area}.gpkg"), layers="per-class", min_area=min_area,
                            classes=["c3", "2"])
        predict_file(EchoBackend(5, TILE), tmp_path / "in.tif", tmp_path / "out.tif",
                     PredictOptions(tile=TILE, overlap=OVERLAP, preview=False, vector=vec))
        assert pyogrio.list_layers(vec.target)[:, 0].tolist() == ["c2", "c3"]
        found = []
        for layer, cid in (("c2", 2), ("c3", 3)):
            geoms, fields = read_features(Path(vec.target), layer)
            assert set(fields["class_id"].tolist()) == {cid} and (fields["pixels"] >= 30).all()
            found += as_set(geoms, fields["class_id"])
        assert sorted(found) == big and len(big) < len([r for r in reference if r[0] in (2, 3)])


def test_simplify_keeps_neighbours_edge_to_edge_and_every_polygon_valid(tmp_path: Path) -> None:
    yy, xx = np.mgrid[:216, :150]
    lab = (((np.sin(yy / 9) + np.cos(xx / 7) + np.sin((xx + yy) / 11)) * 1.5).astype(int) % 4 + 1).astype(np.uint8)
    lab[100:120, 20:40] = 0
    write_tif(tmp_path / "in.tif", lab, nodata=0)
    exact_v, simple_v = VectorOptions(str(tmp_path / "exact.gpkg")), VectorOptions(str(tmp_path / "s.gpkg"), simplify=25.0)
    for vec in (exact_v, simple_v):
        predict_file(EchoBackend(5, TILE), tmp_path / "in.tif", tmp_path / "out.tif",
                     PredictOptions(tile=TILE, overlap=OVERLAP, preview=False, vector=vec))
    exact, ef = read_features(Path(exact_v.target))
    simple, sf = read_features(Path(simple_v.target))
    assert len(simple) == len(exact) and shapely.is_valid(simple).all()
    assert shapely.get_num_coordinates(simple).sum() < 0.6 * shapely.get_num_coordinates(exact).sum()
    assert shapely.coverage_is_valid(simple)  # no overlaps, shared edges identical: no slivers between neighbours
    # nothing moved further than a few tolerances; the union is unchanged: the scene's edge is never
    # simplified, and the nodata rectangle has no vertex to drop
    assert max(shapely.hausdorff_distance(a, b) for a, b in zip(exact, simple)) < 3 * 25.0
    assert shapely.equals(shapely.union_all(simple), shapely.union_all(exact))
    assert_no_same_class_polygons_share_an_edge(simple, sf["class_id"], corners=False)


def test_a_failing_vector_write_is_one_line_and_leaves_no_vector_file(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from segdeploy.errors import OutputError

    write_tif(tmp_path / "in.tif", np.vstack([shapes_scene()] * 2), nodata=0)
    real_write = pyogrio.raw.write

    def disk_full_on_append(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the disk fills up mid-run
        if kwargs.get("append"):
            raise pyogrio.errors.DataSourceError("sqlite3_exec(COMMIT) failed: database or disk is full")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(pyogrio.raw, "write", disk_full_on_append)
    monkeypatch.setattr("segdeploy.vector.BATCH_FEATURES", 50)  # write early: before the last band
    with pytest.raises(OutputError, match=r"^cannot write .*out\.gpkg: sqlite3_exec\(COMMIT\) failed: database or "
                                          r"disk is full; choose another location$"):
        predict_file(EchoBackend(5, TILE), tmp_path / "in.tif", tmp_path / "out.tif",
                     PredictOptions(tile=TILE, overlap=OVERLAP, preview=False, vector=VectorOptions("gpkg")))
    assert not list(tmp_path.glob("*.gpkg")) and not list(tmp_path.glob(".out.partial.gpkg*"))
    assert not [t for t in threading.enumerate() if t.name == "segdeploy-vector"]


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(("vec", "many", "message"), [
    (VectorOptions("out.shp"), False, r"unknown vector format \.shp; end the file name in \.gpkg"),
    (VectorOptions("out.geojson", layers="per-class"), False, r"per-class needs a format with several layers: use \.gpkg"),
    (VectorOptions("out.gpkg", layers="each"), False, r"--vector-layers 'each' is unknown"),
    (VectorOptions("out.gpkg"), True, r"names one file but several rasters are predicted; pass a format \(--vector gpkg\)"),
    (VectorOptions("out.gpkg", min_area="big"), False, r"--min-area 'big' must be an area in map units"),
    (VectorOptions("out.gpkg", simplify=-1.0), False, r"--simplify must be ≥ 0"),
])
def test_bad_vector_options_are_refused_in_one_line(vec: VectorOptions, many: bool, message: str) -> None:
    with pytest.raises(UserError, match=message):
        vec.check(many)


def test_two_inputs_whose_polygons_would_share_a_file_are_refused(tmp_path: Path) -> None:
    from segdeploy.jobs import plan_jobs

    for name in ("a.png", "a.tif", "b.tif"):
        (tmp_path / name).write_bytes(b"")
    files = [tmp_path / "a.png", tmp_path / "a.tif", tmp_path / "b.tif"]
    assert len(plan_jobs(files, tmp_path / "out", True, False)[0]) == 3  # a_pred.png, a_pred.tif: no clash
    with pytest.raises(UserError, match=r"a.tif and .*a.png would both write their polygons to .*a_pred.gpkg; rename"):
        plan_jobs(files, tmp_path / "out", True, False, vector=VectorOptions("gpkg"))


def test_unknown_class_missing_libraries_and_missing_parquet_driver_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"--classes 'watr' is not a class of this model \(did you mean water\?"):
        VectorOptions("o.gpkg", classes=["watr"]).class_ids(["land", "water"])
    assert VectorOptions("o.gpkg", classes=["water", "0"]).class_ids(["land", "water"]) == [0, 1]
    monkeypatch.setattr(pyogrio, "list_drivers", lambda **kw: {"GPKG": "rw"})
    with pytest.raises(BackendUnavailable, match=r"no Parquet driver; install one built with it \(conda install -c "
                                                 r"conda-forge pyogrio libgdal-arrow-parquet\) or write \.gpkg$"):
        VectorOptions("o.parquet").check()
    monkeypatch.setitem(sys.modules, "pyogrio", None)  # as in the core install
    with pytest.raises(BackendUnavailable, match=r"--vector needs pyogrio and shapely \(pyogrio is not installed\): "
                                                 r"pip install 'segdeploy\[vector\]'"):
        VectorOptions("o.gpkg").check()


def test_predict_cli_writes_vectors_beside_each_raster(tiny_onnx: Path, synth_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from segdeploy.cli import app

    scene = synth_dir / "scene/scene.tif"
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        (tmp_path / "in" / f"{name}.tif").symlink_to(scene)
    base = ["predict", str(tiny_onnx), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--no-progress",
            "--no-preview"]
    refused = CliRunner().invoke(app, [*base, "--vector", str(tmp_path / "one.gpkg")])
    assert refused.exit_code == 2 and "pass a format (--vector gpkg)" in refused.output
    refused = CliRunner().invoke(app, [*base, "--min-area", "40px"])
    assert refused.exit_code == 2 and "--min-area shapes the polygons of --vector; add --vector" in refused.output
    refused = CliRunner().invoke(app, [*base, "--vector", "gpkg", "--classes", "feild"])
    assert refused.exit_code == 2 and "did you mean field?" in refused.output
    result = CliRunner().invoke(app, [*base, "--vector", "gpkg", "--classes", "field,water", "--json",
                                      str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    for name in ("a", "b"):
        raster, vec = tmp_path / "out" / f"{name}_pred.tif", tmp_path / "out" / f"{name}_pred.gpkg"
        with rasterio.open(raster) as out:
            pred, transform = out.read(1), out.transform
        geoms, fields = read_features(vec)
        back = rasterize(zip(geoms, fields["class_id"].tolist()), out_shape=pred.shape, transform=transform,
                         fill=255, dtype="uint8")
        assert np.array_equal(back, np.where(np.isin(pred, [0, 2]), pred, 255))  # field = 0, water = 2
        assert set(fields["class_name"].tolist()) <= {"field", "water"}
    summary = json.loads((tmp_path / "s.json").read_text())
    assert all(r["files"][-1].endswith("_pred.gpkg") for r in summary["results"])


def test_seams_dissolve_by_coverage_union_or_by_the_general_union_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """A U whose arms meet three bands down and a ring around a hole, cut into 3-row bands: the
    noded coverage union and its fallback (a general union) give GDAL's own polygon."""
    from segdeploy.vector import dissolve_seams

    lab = np.zeros((12, 9), np.uint8)
    lab[1:11, 1:3] = lab[1:11, 6:8] = lab[9:11, 1:8] = 1
    lab[2:5, 3:6] = 1  # a bar across the top that leaves a hole below it
    parts = [shapely.geometry.shape(g) for y in range(0, 12, 3)
             for g, v in shapes(lab[y:y + 3], mask=lab[y:y + 3] == 1, transform=rasterio.Affine(1, 0, 0, 0, 1, y))]
    whole = [shapely.geometry.shape(g) for g, _ in shapes(lab, mask=lab == 1)]
    assert len(parts) >= 5 and len(whole) == 1 and len(whole[0].interiors) == 1
    assert shapely.equals_exact(shapely.normalize(dissolve_seams(parts)), shapely.normalize(whole[0]), 0)

    def unfit(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise shapely.errors.GEOSException("TopologyException: CoverageUnion cannot process incorrectly noded inputs")

    monkeypatch.setattr(shapely, "coverage_union_all", unfit)
    assert shapely.equals_exact(shapely.normalize(dissolve_seams(parts)), shapely.normalize(whole[0]), 0)
