"""The LSTM diagram (describe(...).plot, `lstmkit params --plot`): its SVG holds exactly what the
text table prints, options change it, its layout has no overlaps, the PNG is a real image."""
from __future__ import annotations

import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from lstmkit import LSTMConfig, describe
from lstmkit.diagram import FORWARD, REVERSE, Box, Line, Row, text_width

SVG = "{http://www.w3.org/2000/svg}"
CONFIGS = {
    "1 layer": LSTMConfig(10, 20),
    "2 layers bidirectional proj": LSTMConfig(64, 128, 2, dropout=0.2, bidirectional=True, proj_size=64),
    "3 layers no bias batch_first": LSTMConfig(5, 7, 3, bias=False, batch_first=True),
    "variants": LSTMConfig(4, 6, 2, bidirectional=True, proj_size=3, layer_norm=True, peephole=True,
                           zoneout=(0.1, 0.05), recurrent_dropout=0.2, weight_drop=0.3, forget_bias=1.0),
    "12 layers": LSTMConfig(64, 128, 12, dropout=0.1, bidirectional=True),
}


def _rows(svg: str, role: str | None = None) -> list[list[str]]:
    """The texts of each row (<g> of <text>), optionally only rows of one role (class)."""
    root = ET.fromstring(svg)
    return [[t.text for t in g.iter(SVG + "text")] for g in root.iter(SVG + "g")
            if role is None or g.get("class") == role]


def _text_table(d) -> list[tuple[str, str, str]]:
    """(name, shape, count) of every row the text table prints."""
    lines = d.text().splitlines()
    start = lines.index(next(ln for ln in lines if ln.startswith("parameter"))) + 1
    rows = []
    for ln in lines[start:]:
        if not ln.strip():
            break
        rows.append(tuple(re.split(r"\s{2,}", ln.strip())))
    return rows


def _shown(n_layers: int) -> set:
    return set(range(n_layers)) if n_layers <= 4 else {0, 1, n_layers - 1}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_svg_holds_every_row_of_the_text_table(name):
    cfg = CONFIGS[name]
    d = describe(cfg, seq_len=9, batch=4)
    svg = d.plot().svg()
    tensor_rows = [tuple(r) for r in _rows(svg, "tensor")]
    table = _text_table(d)
    assert len(table) == len(d.tensors())
    shown = [r for r in table if int(re.search(r"_l(\d+)", r[0]).group(1)) in _shown(cfg.num_layers)]
    assert tensor_rows == shown  # every name, shape and count the text prints, in its order
    assert len(shown) == len(table) or cfg.num_layers > 4
    text = d.text()
    for layer in d.layers():
        if layer["layer"] in _shown(cfg.num_layers):
            line = d.layer_line(layer)
            assert line in text
            assert [line] in _rows(svg, "formula")
            assert ["layer total", f"{layer['count']:,}"] in _rows(svg, "layer-total")
    assert f"total parameters: {d.total:,}" in text
    assert any(f"parameters {d.total:,}" in t[0] for t in _rows(svg, "panel"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_svg_shows_the_shapes_and_state_slots(name):
    cfg = CONFIGS[name]
    d = describe(cfg, seq_len=9, batch=4)
    svg = d.plot().svg()
    io = {r[0]: r[2] for r in _rows(svg, "io")}
    assert io == {k: str(tuple(v)) for k, v in d.shapes().items()}
    state = [r[0] for r in _rows(svg, "state")]
    D = cfg.num_directions
    expected = [f"h0[{s}], c0[{s}] in  →  h_n[{s}], c_n[{s}] out"
                for k in sorted(_shown(cfg.num_layers)) for s in range(k * D, k * D + D)]
    assert state == expected
    left = "(N, T, I)" if cfg.batch_first else "(T, N, I)"
    assert _rows(svg, "io")[0][1] == left


def test_elided_stack_accounts_for_every_parameter():
    d = describe(CONFIGS["12 layers"], seq_len=9, batch=4)
    svg = d.plot().svg()
    elided = " ".join(t for r in _rows(svg, "elided") for t in r)
    assert "layers 2 … 10" in elided
    hidden = int(re.search(r"= ([\d,]+) parameters", elided).group(1).replace(",", ""))
    shown = sum(layer["count"] for layer in d.layers() if layer["layer"] in _shown(12))
    assert shown + hidden == d.total
    fig = d.plot()
    assert fig.width < 1400 and fig.height < 1600  # stays one legible page


def test_bidirectional_adds_the_reverse_column():
    one = describe(LSTMConfig(8, 16, 2)).plot()
    two = describe(LSTMConfig(8, 16, 2, bidirectional=True)).plot()
    strokes = lambda fig: [b.stroke for b in fig.items if isinstance(b, Box)]  # noqa: E731
    assert strokes(one).count(FORWARD[1]) == 2 and strokes(one).count(REVERSE[1]) == 0
    assert strokes(two).count(FORWARD[1]) == 2 and strokes(two).count(REVERSE[1]) == 2
    assert not any("_reverse" in r[0] for r in _rows(one.svg(), "tensor"))
    assert ["weight_hh_l1_reverse", "(64, 16)", "1,024"] in _rows(two.svg(), "tensor")
    assert any("concat" in r[0] for r in _rows(two.svg(), "link"))
    assert two.width > one.width


def test_proj_size_adds_weight_hr_and_the_projection():
    plain = describe(LSTMConfig(8, 16)).plot().svg()
    proj = describe(LSTMConfig(8, 16, proj_size=4)).plot().svg()
    assert not any(r[0].startswith("weight_hr") for r in _rows(plain, "tensor"))
    assert ["weight_hr_l0", "(4, 16)", "64"] in _rows(proj, "tensor")
    assert any("W_hrᵀ" in r[0] for r in _rows(proj, "panel"))
    assert not any("W_hrᵀ" in r[0] for r in _rows(plain, "panel"))


@pytest.mark.parametrize("dropout, layers, pills", [(0.3, 3, 2), (0.0, 3, 0), (0.3, 1, 0)])
def test_dropout_drawn_between_layers_only(dropout, layers, pills):
    svg = describe(LSTMConfig(4, 8, layers, dropout=dropout)).plot().svg()
    # every dropout pill, whatever it says (a "p = 0" pill is one too many); two lines each
    drawn = [r[0] for r in _rows(svg, "dropout")]
    assert drawn == [f"dropout p = {dropout:g}", "zeroes that fraction, training only"] * pills


def test_variants_in_the_legend():
    svg = describe(CONFIGS["variants"]).plot().svg()
    panel = " ".join(r[0] for r in _rows(svg, "panel"))
    for word in ("LN_ih", "p_i ⊙ cₜ₋₁", "zoneout", "recurrent dropout", "weight_drop", "forget_bias"):
        assert word in panel
    assert ["weight_peephole_l1_reverse", "(3, 6)", "18"] in _rows(svg, "tensor")


def _cells(fig):
    """(x0, y0, x1, y1) of every text cell, from its anchor and monospace width."""
    out = []
    for row in (i for i in fig.items if isinstance(i, Row)):
        for c in row.cells:
            w = text_width(c.text, row.size)
            x0 = c.x - {"start": 0, "middle": w / 2, "end": w}[c.anchor]
            out.append((x0, row.y - 0.8 * row.size, x0 + w, row.y + 0.25 * row.size))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layout_text_does_not_overlap_and_stays_in_its_box(name):
    fig = describe(CONFIGS[name], seq_len=9, batch=4).plot()
    cells = _cells(fig)
    for i, a in enumerate(cells):
        for b in cells[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    boxes = [b for b in fig.items if isinstance(b, Box)]
    title_bottom = min(b.y for b in boxes)
    for x0, y0, x1, y1 in cells:
        if y1 <= title_bottom:
            continue  # the title and subtitle
        assert any(b.x <= x0 and x1 <= b.x + b.w and b.y <= y0 and y1 <= b.y + b.h for b in boxes), (x0, y0, x1)
    assert min(r.size for r in fig.items if isinstance(r, Row)) >= 11


@pytest.mark.parametrize("name", list(CONFIGS))
def test_arrows_leave_a_box_bottom_and_meet_a_box_top(name):
    fig = describe(CONFIGS[name]).plot()
    boxes = [b for b in fig.items if isinstance(b, Box)]
    arrows = [a for a in fig.items if isinstance(a, Line) and a.head]
    assert arrows
    for a in arrows:
        (x0, y0), (x1, y1) = a.points[0], a.points[-1]
        assert any(abs(b.y + b.h - y0) < 0.01 and b.x < x0 < b.x + b.w for b in boxes), a
        assert any(abs(b.y - y1) < 0.01 and b.x < x1 < b.x + b.w for b in boxes), a


def test_png_is_a_real_image(tmp_path):
    import matplotlib.image

    fig = describe(CONFIGS["2 layers bidirectional proj"], seq_len=9, batch=4).plot()
    path = tmp_path / "lstm.png"
    fig.save(path)
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert abs(width - 2 * (fig.width + 24)) <= 2 and abs(height - 2 * (fig.height + 24)) <= 2
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05  # something is drawn on the white page


def test_plot_writes_svg_and_returns_the_figure(tmp_path):
    d = describe(CONFIGS["1 layer"])
    fig = d.plot(tmp_path / "a.svg")
    assert (tmp_path / "a.svg").read_text(encoding="utf-8") == fig.svg()
    assert d._repr_svg_() == fig.svg() == fig._repr_svg_()  # Jupyter's inline display
    ET.fromstring(fig.svg())


@pytest.mark.parametrize("path", ["a.jpg", "a", "a.svg.txt"])
def test_plot_bad_extension(tmp_path, path):
    with pytest.raises(ValueError, match=r"\.svg or \.png"):
        describe(CONFIGS["1 layer"]).plot(tmp_path / path)
    assert not (tmp_path / path).exists()


def _cli(*args, pre=""):
    code = f"import sys; {pre}from lstmkit.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "params", *args], capture_output=True, text=True)


@pytest.mark.parametrize("ext", ["svg", "png"])
def test_cli_plot(tmp_path, ext):
    out = tmp_path / f"lstm.{ext}"
    r = _cli("64", "128", "--num-layers", "2", "--bidirectional", "--proj-size", "64", "--seq-len", "10",
             "--batch", "3", "--plot", str(out))
    assert r.returncode == 0, r.stderr
    assert "total parameters: 364,544" in r.stdout
    data = out.read_bytes()
    if ext == "svg":
        assert ["weight_hr_l1_reverse", "(64, 128)", "8,192"] in _rows(data.decode())
    else:
        assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_bad_extension(tmp_path):
    r = _cli("4", "8", "--plot", str(tmp_path / "x.jpg"))
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and ".svg or .png" in r.stderr
    assert not (tmp_path / "x.jpg").exists()


def test_cli_png_without_matplotlib(tmp_path):
    r = _cli("4", "8", "--plot", str(tmp_path / "x.png"), pre="sys.modules['matplotlib'] = None; ")
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "pip install 'lstmkit[train]'" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("4", "8", "--plot", str(tmp_path / "x.svg"), pre="sys.modules['matplotlib'] = None; ")
    assert r.returncode == 0 and (tmp_path / "x.svg").exists()  # SVG needs nothing


def test_sample_picture_in_docs_is_current():
    """docs/img/lstm-2layer-bi.svg (shown in the README) is what the current code draws for
    `lstmkit params 64 128 --num-layers 2 --bidirectional --proj-size 64 --dropout 0.2 --seq-len 10 --batch 3`."""
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "docs" / "img" / "lstm-2layer-bi.svg"
    cfg = LSTMConfig(64, 128, 2, dropout=0.2, bidirectional=True, proj_size=64)
    assert sample.read_text(encoding="utf-8") == describe(cfg, seq_len=10, batch=3).plot().svg()
