"""`qkv plot` and `qkv attention --weights-png`: PNG files that decode to the figure's size, SVG
that parses as XML and carries the labels, a terminal preview, and the usual one-line errors."""
import os
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib

import numpy as np
import pytest

QKV = os.environ.get("QKV_BIN", "qkv")
SVG = "{http://www.w3.org/2000/svg}"


def run(*args, cwd):
    return subprocess.run([QKV, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def decode_png(path):
    """Width, height and the rows of pixels (bytes per pixel from the colour type), checked
    chunk by chunk: CRCs, IHDR first, IDAT inflating to exactly height filtered rows."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, []
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        at += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert depth == 8
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(pixels) == height * (1 + width * channels)
    return width, height


def svg_of(path):
    root = ET.parse(path).getroot()
    texts = [t.text for t in root.iter(SVG + "text")]
    return root, texts


@pytest.fixture
def weights(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.random((3, 4, 5))
    w /= w.sum(-1, keepdims=True)
    np.save(tmp_path / "w.npy", w.astype(np.float32))
    np.save(tmp_path / "w2.npy", w[0].astype(np.float64))
    return tmp_path


ROWS, COLS = "le chat <noir> dort", "the black &cat is sleeping"


def test_png_and_svg_share_one_layout(weights):
    for name in ("p.png", "p.svg"):
        result = run("plot", "w2.npy", "-o", name, "--rows", ROWS, "--cols", COLS, "--title", "t",
                     cwd=weights)
        assert result.returncode == 0, result.stderr
    width, height = decode_png(weights / "p.png")
    root, texts = svg_of(weights / "p.svg")
    assert (width, height) == (int(root.get("width")), int(root.get("height")))
    assert 200 < width < 2000 and 100 < height < 2000
    for label in ROWS.split() + COLS.split():
        assert label in texts, label  # XML-escaped in the file, whole again once parsed
    assert "t" in texts
    # A cell per weight, each shaded: 4 × 5 distinct rectangles at the cell size.
    cells = [r for r in root.iter(SVG + "rect") if r.get("width") == r.get("height")]
    assert len(cells) >= 20


def test_heads_in_a_grid_or_one_head(weights):
    assert run("plot", "w.npy", "-o", "grid.svg", "--grid", cwd=weights).returncode == 0
    _, texts = svg_of(weights / "grid.svg")
    assert {"head 0", "head 1", "head 2"} <= set(texts)
    assert run("plot", "w.npy", "-o", "one.svg", "--head", "1", cwd=weights).returncode == 0
    _, texts = svg_of(weights / "one.svg")
    assert "head 1" in texts and "head 0" not in texts
    assert run("plot", "w.npy", "-o", "grid.png", cwd=weights).returncode == 0
    assert run("plot", "w.npy", "-o", "one.png", "--head", "2", cwd=weights).returncode == 0
    one, grid = decode_png(weights / "one.png"), decode_png(weights / "grid.png")
    assert grid[0] > one[0]  # two panels side by side


def test_terminal_preview_shades_cells_with_labels(weights):
    result = run("plot", "w2.npy", "--rows", ROWS, "--cols", COLS, cwd=weights)
    assert result.returncode == 0, result.stderr
    assert "chat" in result.stdout and "sleep" in result.stdout
    assert any(shade in result.stdout for shade in "░▒▓█")
    assert sorted(p.name for p in weights.iterdir()) == ["w.npy", "w2.npy"]  # no -o: no file


@pytest.mark.parametrize("args,message", [
    (["bad_rank.npy", "-o", "x.png"], "bad_rank.npy: expected [Nq, Nk], [H, Nq, Nk] or [1, H, Nq, Nk]"),
    (["nan.npy", "-o", "x.png"], "nan.npy: expected finite weights, got nan at [0, 1, 2]"),
    (["w2.npy", "-o", "x.png", "--rows", "a b c"], "--rows: expected 4 labels (Nq), got 3"),
    (["w2.npy", "-o", "x.svg", "--cols", "a b c d e f"], "--cols: expected 5 labels (Nk), got 6"),
    (["w.npy", "-o", "x.svg", "--head", "3"], "--head: expected a head in [0, 3), got 3"),
    (["w2.npy", "-o", "x.jpg"], "-o: expected a .png or .svg file, got 'x.jpg'"),
    (["missing.npy", "-o", "x.png"], "missing.npy"),
    (["empty.npy", "-o", "x.svg"], "empty.npy: expected at least one head, query and key, got [0, 3]"),
    (["huge.npy", "-o", "x.svg"], "huge.npy: expected at most 1048576 cells to draw, got 1050000"),
])
def test_bad_input_is_one_line_and_no_file(weights, args, message):
    np.save(weights / "bad_rank.npy", np.zeros(5, dtype=np.float32))
    nan = np.full((2, 3), 0.5, dtype=np.float32)
    nan[1, 2] = np.nan
    np.save(weights / "nan.npy", nan)
    np.save(weights / "empty.npy", np.zeros((0, 3), dtype=np.float32))
    np.save(weights / "huge.npy", np.zeros((1050, 1000), dtype=np.float32))
    result = run("plot", *args, cwd=weights)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert not any(p.name.startswith("x.") or p.name.startswith(".tmp") for p in weights.iterdir())


def test_attention_writes_a_weights_picture(tmp_path):
    rng = np.random.default_rng(1)
    for name, shape in (("q", (2, 6, 2, 4)), ("k", (2, 7, 2, 4)), ("v", (2, 7, 2, 4))):
        np.save(tmp_path / f"{name}.npy", rng.standard_normal(shape, dtype=np.float32))
    result = run("attention", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--out", "o.npy",
                 "--weights-png", "p.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    decode_png(tmp_path / "p.png")
    result = run("attention", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--out", "o.npy",
                 "--weights-png", "p.svg", cwd=tmp_path)
    _, texts = svg_of(tmp_path / "p.svg")
    assert {"head 0", "head 1"} <= set(texts)
    assert {str(j) for j in range(7)} <= set(texts)  # keys labelled by position
    bad = run("attention", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--out", "o2.npy",
              "--weights-png", "p.gif", cwd=tmp_path)
    assert bad.returncode == 2 and "--weights-png: expected a .png or .svg file" in bad.stderr
    assert not (tmp_path / "o2.npy").exists(), "all outputs or none"
