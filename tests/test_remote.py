"""Remote rasters in: GDAL /vsicurl/ through a local HTTP server (127.0.0.1 only), URL and
s3:// spellings, @manifests, and an unreachable URL that fails in one line instead of hanging."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from segdeploy.cli import app
from segdeploy.raster import expand_inputs, gdal_path, input_stem, output_for


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Python's file server answers no Range requests; GDAL's /vsicurl/ needs them."""

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def send_head(self):  # noqa: ANN201
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
        f = path.open("rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.range_left = end - start + 1
        return f

    def copyfile(self, source, outputfile) -> None:  # noqa: ANN001
        left = getattr(self, "range_left", None)
        if left is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(left))
        return None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_urls_keep_their_double_slashes_and_become_gdal_paths(tmp_path: Path) -> None:
    assert gdal_path("https://host/a/scene.tif?sig=x") == "/vsicurl/https://host/a/scene.tif?sig=x"
    assert gdal_path("s3://bucket/k/scene.tif") == "/vsis3/bucket/k/scene.tif"
    assert gdal_path("gs://bucket/scene.tif") == "/vsigs/bucket/scene.tif"
    assert gdal_path("/vsicurl/http://host/x.tif") == "/vsicurl/http://host/x.tif"
    assert gdal_path(str(tmp_path / "local.tif")) is None
    found = expand_inputs(["/vsicurl/http://host/x.tif", "s3://b/y.tif"])
    assert found == ["/vsicurl/http://host/x.tif", "/vsis3/b/y.tif"]  # strings, never Path('/vsicurl/http:/host')
    assert input_stem("/vsicurl/https://host/a/scene.tif?sig=x") == "scene"
    assert output_for("/vsis3/b/k/scene.tif", tmp_path, many=True) == tmp_path / "scene_pred.tif"


def test_predict_reads_a_remote_raster_and_a_manifest_like_local_files(tiny_run: Path, synth_dir: Path,
                                                                      tmp_path: Path, server: tuple[str, Path]) -> None:
    base, root = server
    scene = synth_dir / "scene/scene.tif"
    (root / "remote.tif").write_bytes(scene.read_bytes())
    runner = CliRunner()
    args = ["--tile", "64", "--overlap", "16", "--no-progress", "--no-preview"]
    local = runner.invoke(app, ["predict", str(tiny_run), str(scene), "--out", str(tmp_path / "local.tif"), *args])
    assert local.exit_code == 0, local.output
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# two scenes\n{base}/remote.tif\n\n../{tmp_path.name}/local_copy.tif\n")
    (tmp_path / "local_copy.tif").write_bytes(scene.read_bytes())
    result = runner.invoke(app, ["predict", str(tiny_run), f"@{manifest}", "--out", str(tmp_path / "many"), *args,
                                 "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    done = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["input"] for r in done] == [f"/vsicurl/{base}/remote.tif", str(tmp_path / "local_copy.tif")]
    with rasterio.open(tmp_path / "local.tif") as a, rasterio.open(tmp_path / "many/remote_pred.tif") as b:
        assert np.array_equal(a.read(1), b.read(1)) and a.crs == b.crs and a.transform == b.transform
    assert (tmp_path / "many/local_copy_pred.tif").exists()


def test_an_unreachable_url_fails_in_one_line_naming_it(tiny_run: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port on 127.0.0.1 with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/scene.tif"
    monkeypatch.setitem(os.environ, "GDAL_HTTP_MAX_RETRY", "0")
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ["predict", str(tiny_run), url, "--out", str(tmp_path / "o.tif"), "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "cannot open raster" in lines[0]
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "o.tif").exists()
    missing = CliRunner().invoke(app, ["predict", str(tiny_run), "@nowhere.txt", "--out", str(tmp_path / "o.tif")])
    assert missing.exit_code == 2 and "manifest nowhere.txt not found" in missing.output
