"""The picture of an LSTM: the stack of layers and directions, every tensor with its shape
and count, the shapes going in and out, which slot of h_n / c_n each layer-direction
fills, the gate equations, the total and the memory.

`draw(description)` lays the picture out once, as a list of shapes in pixels (boxes,
lines, rows of text). `Diagram.svg()` writes that list as SVG by hand (no dependency);
`Diagram.save("x.png")` draws the same list with matplotlib (the `train` extra). Every
name, shape and count is one of Description's own strings, so the picture and the text
table cannot disagree. Torch-free, like describe.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

FONT = "DejaVu Sans Mono, Menlo, Consolas, monospace"
MPL_FONT = "DejaVu Sans Mono"  # ships with matplotlib, so the PNG never falls back
CHAR_EM = 0.6  # advance of one monospace character, in em: lets the layout size boxes without a font engine
SIZE, SMALL, HEAD, TITLE = 12, 11, 13, 15  # font sizes, px
LINE = 17  # px between baselines of 12 px rows
PAD = 10  # inside a box
GAP = 30  # vertical room for an arrow between two stages
COL_GAP = 40  # between the forward and the reverse column
MARGIN = 24
TITLE_CHARS = 110  # a longer signature (variant options) wraps
MAX_SHOWN_LAYERS = 4  # more layers: show 0, 1 and the last, elide the middle

INK, MUTED, ARROW = "#1f2328", "#59636e", "#57606a"
FORWARD = ("#eef4ff", "#3a6ed8")
REVERSE = ("#fff2e6", "#d0782a")
IO = ("#eef8f0", "#3c8d50")
DROPOUT = ("#f6effc", "#8250c4")
ELIDED = ("#f6f8fa", "#8c959f")
PANEL = ("#fbfbfc", "#d0d7de")


# ---- shapes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float
    fill: str
    stroke: str
    dashed: bool = False


@dataclass(frozen=True)
class Line:
    points: tuple  # ((x, y), ...): a polyline
    color: str = ARROW
    head: bool = True  # arrow head at the last point


@dataclass(frozen=True)
class Cell:
    x: float
    text: str
    anchor: str = "start"  # start | middle | end, as SVG's text-anchor


@dataclass(frozen=True)
class Row:
    """One line of text: cells at their x, sharing a baseline. `role` tags rows that
    programs look for (e.g. "tensor" rows hold name, shape, count)."""

    y: float
    cells: tuple
    size: float = SIZE
    color: str = INK
    bold: bool = False
    role: str = ""


def picture_format(path) -> str:
    """'.svg' or '.png' from the file name; ValueError for anything else."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in (".svg", ".png"):
        raise ValueError(f"the diagram is written as .svg or .png, got {str(path)!r}")
    return ext


def text_width(text: str, size: float) -> float:
    return len(text) * CHAR_EM * size


# ---- the figure ------------------------------------------------------------------------------
@dataclass
class Diagram:
    """The laid-out picture. `svg()` / `save(path)`; shows itself inline in Jupyter."""

    title: str
    items: list = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0

    def add(self, item):
        self.items.append(item)
        self.width = max(self.width, _right_edge(item))
        self.height = max(self.height, _bottom_edge(item))
        return item

    def svg(self) -> str:
        w, h = int(self.width + MARGIN), int(self.height + MARGIN)
        colors = sorted({i.color for i in self.items if isinstance(i, Line) and i.head})
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
               f'font-family="{FONT}" xml:space="preserve" style="white-space:pre">',
               f"<title>{escape(self.title)}</title>", "<defs>"]
        out += [f'<marker id="{_marker_id(c)}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
                f'markerHeight="8" markerUnits="userSpaceOnUse" orient="auto"><path d="M0,0 L10,5 L0,10 z" '
                f'fill="{c}"/></marker>' for c in colors]
        out += ["</defs>", f'<rect width="{w}" height="{h}" fill="white"/>']
        out += [_svg_item(i) for i in self.items]
        out.append("</svg>")
        return "\n".join(out) + "\n"

    def _repr_svg_(self) -> str:
        return self.svg()

    def save(self, path) -> None:
        """Write the picture: .svg as is, .png through matplotlib. Other extensions: ValueError."""
        if picture_format(path) == ".svg":
            with open(path, "w", encoding="utf-8") as f:
                f.write(self.svg())
        else:
            self.save_png(path)

    def save_png(self, path, scale: float = 2.0) -> None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError("a .png diagram needs matplotlib: pip install 'lstmkit[train]' "
                              "(or write .svg, which needs nothing)") from e
        w, h = self.width + MARGIN, self.height + MARGIN
        fig = Figure(figsize=(w / 100, h / 100), dpi=100)  # 1 px of the layout = 1/100 inch
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis("off")
        for item in self.items:
            _mpl_item(ax, item)
        fig.savefig(path, dpi=100 * scale, facecolor="white")


def _right_edge(item) -> float:
    if isinstance(item, Box):
        return item.x + item.w
    if isinstance(item, Line):
        return max(x for x, _ in item.points)
    shift = {"start": 1.0, "middle": 0.5, "end": 0.0}
    return max(c.x + shift[c.anchor] * text_width(c.text, item.size) for c in item.cells)


def _bottom_edge(item) -> float:
    if isinstance(item, Box):
        return item.y + item.h
    if isinstance(item, Line):
        return max(y for _, y in item.points)
    return item.y + 0.3 * item.size  # descenders


def _marker_id(color: str) -> str:
    return "head" + color.lstrip("#")


def _svg_item(item) -> str:
    if isinstance(item, Box):
        dash = ' stroke-dasharray="6 4"' if item.dashed else ""
        return (f'<rect x="{item.x:.1f}" y="{item.y:.1f}" width="{item.w:.1f}" height="{item.h:.1f}" rx="6" '
                f'fill="{item.fill}" stroke="{item.stroke}" stroke-width="1.5"{dash}/>')
    if isinstance(item, Line):
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in item.points)
        head = f' marker-end="url(#{_marker_id(item.color)})"' if item.head else ""
        return f'<polyline points="{pts}" fill="none" stroke="{item.color}" stroke-width="1.5"{head}/>'
    weight = ' font-weight="bold"' if item.bold else ""
    role = f' class="{item.role}"' if item.role else ""
    texts = [f'<text x="{c.x:.1f}" y="{item.y:.1f}" text-anchor="{c.anchor}">{escape(c.text)}</text>'
             for c in item.cells]
    return f'<g{role} font-size="{item.size}" fill="{item.color}"{weight}>' + "".join(texts) + "</g>"


def _mpl_item(ax, item) -> None:
    from matplotlib.patches import FancyBboxPatch

    pt = 0.72  # points per layout pixel at 100 dpi
    if isinstance(item, Box):
        ax.add_patch(FancyBboxPatch((item.x, item.y), item.w, item.h, boxstyle="round,pad=0,rounding_size=6",
                                    facecolor=item.fill, edgecolor=item.stroke, linewidth=1.5 * pt,
                                    linestyle=(0, (6 / 1.5, 4 / 1.5)) if item.dashed else "-"))
    elif isinstance(item, Line):
        xs, ys = zip(*item.points)
        ax.plot(xs, ys, color=item.color, linewidth=1.5 * pt, solid_capstyle="butt")
        if item.head:
            ax.annotate("", xy=item.points[-1], xytext=item.points[-2],
                        arrowprops=dict(arrowstyle="-|>", color=item.color, linewidth=1.5 * pt,
                                        shrinkA=0, shrinkB=0, mutation_scale=8 / pt))
    else:
        for c in item.cells:
            ax.text(c.x, item.y, c.text, fontsize=item.size * pt, family=MPL_FONT, color=item.color,
                    weight="bold" if item.bold else "normal", va="baseline",
                    ha={"start": "left", "middle": "center", "end": "right"}[c.anchor], parse_math=False)


# ---- drawing an LSTM ---------------------------------------------------------------------------
def draw(d) -> Diagram:
    """The Diagram of a Description (lstmkit.describe(...))."""
    fig = Diagram(title=f"{d.signature()}: {d.total:,} parameters")
    y = _title(fig, d)
    right = _stack(fig, d, MARGIN, y + 16)
    _side_panel(fig, d, right + 48, y + 16)
    return fig


def _wrap(text: str, width: int) -> list:
    """Split a long signature after ', ' so no line passes `width` characters."""
    lines, line = [], ""
    for part in text.split(", "):
        candidate = f"{line}, {part}" if line else part
        if line and len(candidate) + 1 > width:
            lines.append(line + ",")
            candidate = part
        line = candidate
    return lines + [line]


def _title(fig: Diagram, d) -> float:
    from .describe import format_bytes

    y = MARGIN + TITLE
    for i, line in enumerate(_wrap(d.signature(), TITLE_CHARS)):
        fig.add(Row(y, (Cell(MARGIN + (0 if i == 0 else 5 * CHAR_EM * TITLE), line),), size=TITLE, bold=True))
        y += 20
    y += 2
    sub = (f"{d.total:,} parameters  ·  {format_bytes(d.memory()['parameters'])} at {d.dtype}  ·  "
           f"shapes for T = {d.seq_len} steps, N = {d.batch} sequences")
    fig.add(Row(y, (Cell(MARGIN, sub),), color=MUTED))
    return y


class _Symbols:
    """Shape formulas in letters: I, H, P, L, D, T, N (simplified when a factor is 1)."""

    def __init__(self, c):
        self.state_lead = "L·D" if c.bidirectional else "L"
        self.h = "P" if c.proj_size else "H"
        self.out = ("2·" if c.bidirectional else "") + self.h
        self.time_batch = "N, T" if c.batch_first else "T, N"


def _io_rows(d, outputs: bool) -> list[tuple[str, str, str, str]]:
    """(name, shape in letters, shape in numbers, note) for the inputs or the outputs box."""
    c, sh, sym = d.config, d.shapes(), _Symbols(d.config)
    step = f"one step: ({d.batch}, {c.input_size})"
    if not outputs:
        return [("input", f"({sym.time_batch}, I)", str(tuple(sh["input"])), f"xₜ, {step}"),
                ("h0", f"({sym.state_lead}, N, {sym.h})", str(tuple(sh["h0"])), "zeros when not passed"),
                ("c0", f"({sym.state_lead}, N, H)", str(tuple(sh["c0"])), "zeros when not passed")]
    last = "hₜ of the last layer at every t" + (", both directions side by side" if c.bidirectional else "")
    return [("output", f"({sym.time_batch}, {sym.out})", str(tuple(sh["output"])), last),
            ("h_n", f"({sym.state_lead}, N, {sym.h})", str(tuple(sh["h_n"])), "last hₜ of every layer-direction"),
            ("c_n", f"({sym.state_lead}, N, H)", str(tuple(sh["c_n"])), "last cₜ of every layer-direction")]


def _io_columns(d) -> list:
    """Character widths of the 4 columns, shared by the inputs and the outputs box."""
    rows = _io_rows(d, False) + _io_rows(d, True)
    return [max(len(r[i]) for r in rows) for i in range(4)]


def _io_width(d) -> float:
    return text_width(" " * (sum(_io_columns(d)) + 9), SIZE) + 2 * PAD


def _io_box(fig, d, outputs: bool, x: float, y: float, width: float) -> float:
    """The inputs (or outputs) box: name, shape in letters, in numbers, a note; returns its bottom."""
    rows = _io_rows(d, outputs)
    offsets = [0.0]
    for n in _io_columns(d)[:-1]:
        offsets.append(offsets[-1] + text_width(" " * (n + 3), SIZE))
    h = PAD + len(rows) * LINE + 6
    fig.add(Box(x, y, width, h, *IO))
    for i, r in enumerate(rows):
        base = y + PAD + SIZE + i * LINE
        cells = tuple(Cell(x + PAD + off, t) for off, t in zip(offsets, r))
        fig.add(Row(base, cells[:3], role="io"))
        fig.add(Row(base, cells[3:], color=MUTED))
    return y + h


# ---- the stack ---------------------------------------------------------------------------------
def _shown_layers(num_layers: int) -> list:
    """Layer indices to draw, with ("elided", first, last) standing in for the middle."""
    if num_layers <= MAX_SHOWN_LAYERS:
        return list(range(num_layers))
    return [0, 1, ("elided", 2, num_layers - 2), num_layers - 1]


def _layer_rows(d, k: int, direction: int) -> dict:
    layer = d.layers()[k * d.config.num_directions + direction]
    return {"tensors": d.table_rows(k, direction), "total": f"{layer['count']:,}", "formula": d.layer_line(layer)}


def _layer_box_width(d, shown) -> float:
    widths = []
    for k in (k for k in shown if isinstance(k, int)):
        for direction in range(d.config.num_directions):
            r = _layer_rows(d, k, direction)
            cols = [max(len(t[i]) for t in r["tensors"] + [("parameter", "shape", "count")]) for i in range(3)]
            widths.append(text_width(" " * (sum(cols) + 6), SIZE))
            widths.append(text_width(r["formula"], SMALL))
            widths.append(text_width(_state_line(d, k, direction), SMALL))
            widths.append(text_width(f"layer {k} · reverse   t = {d.seq_len} → 1", HEAD))
    return max(widths) + 2 * PAD


def _state_line(d, k: int, direction: int) -> str:
    s = k * d.config.num_directions + direction
    return f"h0[{s}], c0[{s}] in  →  h_n[{s}], c_n[{s}] out"


def _layer_box(fig, d, k: int, direction: int, x: float, y: float, w: float) -> float:
    """One layer-direction: its tensors, total, formula and state slot; returns its bottom."""
    r = _layer_rows(d, k, direction)
    colors = REVERSE if direction else FORWARD
    n = len(r["tensors"])
    h = PAD + HEAD + 8 + (n + 2) * LINE + 10 + 2 * (SMALL + 6) + PAD
    fig.add(Box(x, y, w, h, *colors))
    left, right = x + PAD, x + w - PAD
    base = y + PAD + HEAD
    steps = f"t = {d.seq_len} → 1" if direction else f"t = 1 → {d.seq_len}"
    fig.add(Row(base, (Cell(left, f"layer {k} · {'reverse' if direction else 'forward'}"),),
                size=HEAD, bold=True, color=colors[1]))
    fig.add(Row(base, (Cell(right, steps, "end"),), size=SMALL, color=MUTED))
    cols = [max(len(t[i]) for t in r["tensors"] + [("parameter", "shape", "count")]) for i in range(2)]
    shape_x = left + text_width(" " * (cols[0] + 3), SIZE)
    base += 8 + LINE
    fig.add(Row(base, (Cell(left, "parameter"), Cell(shape_x, "shape"), Cell(right, "count", "end")),
                size=SMALL, color=MUTED))
    for name, shape, count in r["tensors"]:
        base += LINE
        fig.add(Row(base, (Cell(left, name), Cell(shape_x, shape), Cell(right, count, "end")), role="tensor"))
    fig.add(Line(((left, base + 7), (right, base + 7)), color=colors[1], head=False))
    base += LINE + 4
    fig.add(Row(base, (Cell(left, "layer total"), Cell(right, r["total"], "end")), bold=True, role="layer-total"))
    base += SMALL + 8
    fig.add(Row(base, (Cell(left, r["formula"]),), size=SMALL, color=MUTED, role="formula"))
    base += SMALL + 6
    fig.add(Row(base, (Cell(left, _state_line(d, k, direction)),), size=SMALL, color=MUTED, role="state"))
    return y + h


def _pill(fig, lines: list, cx: float, y: float, colors, dashed=False, min_w=0.0, role="") -> float:
    """A centered box of text lines (first bold); returns its bottom."""
    w = max([min_w] + [text_width(t, SIZE) + 2 * PAD for t in lines])
    h = 8 + len(lines) * LINE + 2
    fig.add(Box(cx - w / 2, y, w, h, *colors, dashed=dashed))
    for i, t in enumerate(lines):
        fig.add(Row(y + 6 + SIZE + i * LINE, (Cell(cx, t, "middle"),), bold=(i == 0), role=role,
                    color=INK if i == 0 else MUTED))
    return y + h


def _link_lines(d, k: int) -> list:
    """What leaves layer k for layer k+1 (the concatenation, in shapes)."""
    c = d.config
    shape = (d.batch, d.seq_len, c.output_size) if c.batch_first else (d.seq_len, d.batch, c.output_size)
    if c.bidirectional:
        return [f"layer {k} output = concat(→ hₜ, ← hₜ): {shape}", f"input of layer {k + 1}, I = {c.output_size}"]
    return [f"layer {k} output hₜ: {shape}", f"input of layer {k + 1}, I = {c.output_size}"]


def _connect(fig, tops_from: list, y0: float, tops_to: list, y1: float) -> None:
    """Arrows from the bottoms (x's at y0) of one stage to the tops (x's at y1) of the next:
    straight, fork (1 -> 2) or merge (2 -> 1)."""
    mid = (y0 + y1) / 2
    if len(tops_from) == len(tops_to):
        for a, b in zip(tops_from, tops_to):
            fig.add(Line(((a, y0), (a, mid), (b, mid), (b, y1)) if a != b else ((a, y0), (b, y1))))
    elif len(tops_from) == 1:
        for b in tops_to:
            fig.add(Line(((tops_from[0], y0), (tops_from[0], mid), (b, mid), (b, y1))))
    else:
        for a in tops_from:
            fig.add(Line(((a, y0), (a, mid), (tops_to[0], mid), (tops_to[0], y1))))


def _stack(fig, d, x: float, y: float) -> float:
    """The column of inputs, layers, links and outputs; returns its right edge."""
    c = d.config
    shown = _shown_layers(c.num_layers)
    bw = _layer_box_width(d, shown)
    width = max(c.num_directions * bw + (c.num_directions - 1) * COL_GAP, _io_width(d))
    col_x = [x + (width - (c.num_directions * bw + (c.num_directions - 1) * COL_GAP)) / 2 + i * (bw + COL_GAP)
             for i in range(c.num_directions)]
    col_mid = [cx + bw / 2 for cx in col_x]
    mid = x + width / 2

    bottom = _io_box(fig, d, False, x, y, width)
    prev = [mid]
    for item in shown:
        top = bottom + GAP
        if isinstance(item, tuple):
            _connect(fig, prev, bottom, [mid], top)
            bottom = _elided_box(fig, d, item[1], item[2], x, top, width)
            prev, k = [mid], item[2]
        else:
            _connect(fig, prev, bottom, col_mid, top)
            bottom = max(_layer_box(fig, d, item, i, col_x[i], top, bw) for i in range(c.num_directions))
            prev, k = col_mid, item
        if k < c.num_layers - 1:
            bottom, prev = _between_layers(fig, d, k, prev, bottom, mid), [mid]
    top = bottom + GAP + 6
    _connect(fig, prev, bottom, [mid], top)
    _io_box(fig, d, True, x, top, width)
    return x + width


def _between_layers(fig, d, k: int, prev: list, bottom: float, mid: float) -> float:
    """Layer k's output (concatenated when bidirectional), then dropout when it applies;
    returns the bottom."""
    _connect(fig, prev, bottom, [mid], bottom + GAP)
    bottom = _pill(fig, _link_lines(d, k), mid, bottom + GAP, ELIDED, role="link")
    p = d.config.dropout
    if p > 0:
        _connect(fig, [mid], bottom, [mid], bottom + GAP)
        bottom = _pill(fig, [f"dropout p = {p:g}", "zeroes that fraction, training only"], mid,
                       bottom + GAP, DROPOUT, dashed=True, role="dropout")
    return bottom


def _elided_box(fig, d, first: int, last: int, x: float, y: float, w: float) -> float:
    c = d.config
    D = c.num_directions
    n = last - first + 1
    each = d.layers()[D]["count"]  # layer 1's: every layer above 0 has the same shapes
    rev = " (and _reverse)" if c.bidirectional else ""
    lines = [f"⋮  layers {first} … {last}: {n} more layers like layer 1",
             f"tensors weight_ih_l{first} … weight_ih_l{last}, weight_hh_l{first} …{rev}: layer 1's shapes",
             f"{n} × {D} × {each:,} = {n * D * each:,} parameters",
             f"state slots h_n[{first * D}] … h_n[{(last + 1) * D - 1}], c_n likewise"]
    if c.dropout > 0:
        lines.append(f"dropout p = {c.dropout:g} between them (training only)")
    return _pill(fig, lines, x + w / 2, y, ELIDED, dashed=True, min_w=w, role="elided")


# ---- the side panel: sizes, state slots, equations, totals ----------------------------------
def _side_panel(fig, d, x: float, y: float) -> None:
    sections = [("Sizes", _size_lines(d)), ("Where h_n and c_n come from", _slot_lines(d)),
                ("One step of one layer-direction", _equation_lines(d)), ("Totals", _total_lines(d))]
    width = max(text_width(t, SIZE) for _, lines in sections for t in lines) + 2 * PAD
    for heading, lines in sections:
        h = PAD + HEAD + 6 + len(lines) * LINE + 10
        fig.add(Box(x, y, width, h, *PANEL))
        fig.add(Row(y + PAD + HEAD, (Cell(x + PAD, heading),), size=HEAD, bold=True))
        for i, t in enumerate(lines):
            fig.add(Row(y + PAD + HEAD + 6 + (i + 1) * LINE, (Cell(x + PAD, t),), role="panel"))
        y += h + 14


def _size_lines(d) -> list:
    c = d.config
    sizes = [("I", c.input_size, "input_size"),
             ("H", c.hidden_size, f"hidden_size  (4H = {4 * c.hidden_size} gate rows: i f g o)")]
    if c.proj_size:
        sizes.append(("P", c.proj_size, "proj_size  (h is projected from H to P)"))
    sizes += [("L", c.num_layers, "num_layers"),
              ("D", c.num_directions, "directions, bidirectional" if c.bidirectional else "direction, not bidirectional"),
              ("T", d.seq_len, "time steps (seq_len)"), ("N", d.batch, "sequences (batch)")]
    lines = [f"{letter} = {value:<6} {meaning}" for letter, value, meaning in sizes]
    lines.append(f"batch_first={c.batch_first}: input and output are ({'N, T' if c.batch_first else 'T, N'}, ·)")
    lines.append(f"h0, c0, h_n, c_n are ({'L·D' if c.bidirectional else 'L'}, N, ·) either way")
    return lines


def _slot_lines(d) -> list:
    c = d.config
    D, P = c.num_directions, c.real_hidden_size
    lines = []
    for item in _shown_layers(c.num_layers):
        if isinstance(item, tuple):
            lines.append(f"h_n[{item[1] * D}] … h_n[{(item[2] + 1) * D - 1}]  layers {item[1]} … {item[2]}")
            continue
        for direction in range(D):
            s = item * D + direction
            lines.append(f"h_n[{s}], c_n[{s}]  layer {item} {'reverse' if direction else 'forward'}")
    lines.append(f"each h_n[s]: (N, {'P' if c.proj_size else 'H'}) = ({d.batch}, {P}), "
                 f"each c_n[s]: (N, H) = ({d.batch}, {c.hidden_size})")
    last = (c.num_layers - 1) * D
    t_last, t_first = ("[:, -1", "[:, 0") if c.batch_first else ("[-1, :", "[0, :")
    if c.bidirectional:
        lines.append(f"output{t_last}, :{P}] == h_n[{last}]  (forward ends at t = T)")
        lines.append(f"output{t_first}, {P}:] == h_n[{last + 1}]  (reverse ends at t = 1)")
    else:
        lines.append(f"output{t_last}] == h_n[{last}]  (the last step of the last layer)")
    return lines


def _equation_lines(d) -> list:
    c = d.config
    H = c.hidden_size
    h_prev = "(hₜ₋₁ ⊙ m)" if c.recurrent_dropout else "hₜ₋₁"
    if c.layer_norm:
        z = f"zₜ = LN_ih(xₜ·W_ihᵀ) + LN_hh({h_prev}·W_hhᵀ)" + (" + b_ih + b_hh" if c.bias else "")
    else:
        z = f"zₜ = xₜ·W_ihᵀ" + (" + b_ih" if c.bias else "") + f" + {h_prev}·W_hhᵀ" + (" + b_hh" if c.bias else "")
    peep = {g: f" + p_{g} ⊙ {'cₜ' if g == 'o' else 'cₜ₋₁'}" if c.peephole else "" for g in "ifo"}
    cell_in = "LN_cell(cₜ)" if c.layer_norm else "cₜ"
    steps = [(f"iₜ = σ(zₜ[0:{H}]{peep['i']})", "input gate"),
             (f"fₜ = σ(zₜ[{H}:{2 * H}]{peep['f']})", "forget gate"),
             (f"gₜ = tanh(zₜ[{2 * H}:{3 * H}])", "cell candidate"),
             (f"oₜ = σ(zₜ[{3 * H}:{4 * H}]{peep['o']})", "output gate"),
             ("cₜ = fₜ ⊙ cₜ₋₁ + iₜ ⊙ gₜ", "new cell state")]
    if c.proj_size:
        steps.append((f"hₜ = (oₜ ⊙ tanh({cell_in}))·W_hrᵀ", f"projected H → P = {c.proj_size}"))
    else:
        steps.append((f"hₜ = oₜ ⊙ tanh({cell_in})", "new hidden state"))
    width = max(len(e) for e, _ in steps) + 3
    lines = [z, f"     {4 * H} values, rows [i | f | g | o], {H} each"]
    lines += [f"{e:<{width}}{note}" for e, note in steps]
    lines += _variant_lines(d)
    lines += ["W_ih, W_hh, b_ih, b_hh" + (", W_hr" if c.proj_size else "") + " are that layer-direction's",
              "weight_ih_lk, weight_hh_lk, ... ; σ = sigmoid, ⊙ = elementwise"]
    return lines


def _variant_lines(d) -> list:
    c = d.config
    lines = []
    if c.layer_norm:
        lines.append("LN = layer norm with its own gain and bias (layer_norm_*)")
    if c.peephole:
        lines.append("p_i, p_f, p_o = rows of weight_peephole")
    pc, ph = c.zoneout_probs
    if (pc, ph) != (0.0, 0.0):
        lines += [f"zoneout: cₜ keeps cₜ₋₁ with p = {pc:g}, hₜ keeps hₜ₋₁ with p = {ph:g}",
                  "         (training; in eval the p-weighted mean)"]
    if c.recurrent_dropout:
        lines.append(f"m = recurrent dropout mask, p = {c.recurrent_dropout:g}, one per sequence (training)")
    if c.weight_drop:
        lines.append(f"weight_drop: W_hh ⊙ mask, p = {c.weight_drop:g}, one per forward (training)")
    if c.forget_bias:
        lines.append(f"forget_bias: {c.forget_bias:+g} added to b_ih[{c.hidden_size}:{2 * c.hidden_size}] at init")
    return lines


def _total_lines(d) -> list:
    from .describe import format_bytes

    D = d.config.num_directions
    n = d.config.num_layers * D
    lines = [f"parameters {d.total:,}  ({n} layer-direction{'s' if n > 1 else ''})", f"memory at {d.dtype}:"]
    lines += [f"  {name:<10} {format_bytes(b)}" for name, b in d.memory().items()]
    return lines
