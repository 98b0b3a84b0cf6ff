"""Parameter accounting: every tensor, per-layer totals, the formula, shapes and memory.

`describe(config_or_module, seq_len=, batch=, dtype=)` returns a Description (`.text()` for
people, `.to_dict()` for programs, `.plot(path)` for the picture that diagram.py draws);
`lstmkit params ...` (cli/params.py) is its command line.
Torch-free: it works from an LSTMConfig (a module is read through its `.config`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import LSTMConfig

DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


def _count(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def format_shape(shape) -> str:
    """A parameter's shape as the table prints it: (512, 64), (512)."""
    return "(" + ", ".join(map(str, shape)) + ")"


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


@dataclass
class Description:
    config: LSTMConfig
    seq_len: int
    batch: int
    dtype: str = "float32"

    # ---- the numbers ------------------------------------------------------------------
    def tensors(self) -> list[dict]:
        return [{"name": n, "shape": list(s), "count": _count(s)} for n, s in self.config.param_shapes()]

    @property
    def total(self) -> int:
        return sum(t["count"] for t in self.tensors())

    def layers(self) -> list[dict]:
        c = self.config
        out = []
        for k in range(c.num_layers):
            for d in range(c.num_directions):
                n = sum(_count(s) for _, s in c.layer_param_shapes(k, d))
                out.append({"layer": k, "direction": "reverse" if d else "forward", "count": n,
                            "formula": self._layer_formula(k)})
        return out

    def _layer_formula(self, k: int) -> str:
        c = self.config
        H, P, I = c.hidden_size, c.real_hidden_size, c.layer_input_size(k)
        s = f"4*{H}*({I} + {P})"
        if c.bias:
            s += f" + 2*4*{H}"
        if c.proj_size:
            s += f" + {P}*{H}"
        if c.layer_norm:
            s += f" + 2*(4*{H} + 4*{H} + {H})"
        if c.peephole:
            s += f" + 3*{H}"
        return s

    def formula(self) -> str:
        c = self.config
        s = "per layer and direction: 4*H*(I_k + P)"
        if c.bias:
            s += " + 2*4*H"
        if c.proj_size:
            s += " + P*H"
        if c.layer_norm:
            s += " + 2*(4H + 4H + H) (layer norm gains and biases)"
        if c.peephole:
            s += " + 3*H (peepholes)"
        s += "   (I_0 = input_size, I_k = D*P for k > 0, P = proj_size or H, D = 2 if bidirectional)"
        return s

    def shapes(self) -> dict:
        c = self.config
        T, N = self.seq_len, self.batch
        h_shape, c_shape = c.state_shapes(N)
        x = (N, T, c.input_size) if c.batch_first else (T, N, c.input_size)
        y = (N, T, c.output_size) if c.batch_first else (T, N, c.output_size)
        return {"input": list(x), "h0": list(h_shape), "c0": list(c_shape), "output": list(y),
                "h_n": list(h_shape), "c_n": list(c_shape)}

    def memory(self, dtype: str | None = None) -> dict:
        """Bytes of parameters, gradients, input, output and states at `dtype` (default: self.dtype)."""
        size = DTYPE_BYTES[dtype or self.dtype]
        sh = self.shapes()
        return {
            "parameters": self.total * size,
            "gradients": self.total * size,
            "input": _count(sh["input"]) * size,
            "output": _count(sh["output"]) * size,
            "state": 2 * (_count(sh["h0"]) + _count(sh["c0"])) * size,  # h0, c0, h_n, c_n
        }

    def memory_float32(self) -> dict:
        return self.memory("float32")

    # ---- the strings the text table prints (the diagram prints the same ones) ---------------
    def signature(self) -> str:
        """LSTM(input_size=..., ...): nn.LSTM's arguments always, the variant options only when set."""
        c = self.config
        args = ", ".join(f"{k}={v}" for k, v in {**c.torch_kwargs(), **c.variant_kwargs()}.items())
        return f"LSTM({args})"

    def table_rows(self, layer: int | None = None, direction: int = 0) -> list[tuple[str, str, str]]:
        """(name, shape, count) as printed: every tensor, or one layer-direction's."""
        c = self.config
        shapes = c.param_shapes() if layer is None else c.layer_param_shapes(layer, direction)
        return [(n, format_shape(s), f"{_count(s):,}") for n, s in shapes]

    @staticmethod
    def layer_line(layer: dict) -> str:
        """'<formula> = <count>' for one entry of layers(), as printed."""
        return f"{layer['formula']} = {layer['count']:,}"

    # ---- the picture -------------------------------------------------------------------------
    def plot(self, path=None):
        """The diagram (lstmkit.diagram.Diagram); written to `path` (.svg, or .png with
        matplotlib) when given. In a notebook the returned object displays inline."""
        from .diagram import draw

        figure = draw(self)
        if path is not None:
            figure.save(path)
        return figure

    def _repr_svg_(self) -> str:  # Jupyter shows a Description as its diagram
        return self.plot().svg()

    # ---- presentations ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "total": self.total,
            "tensors": self.tensors(),
            "layers": self.layers(),
            "formula": self.formula(),
            "seq_len": self.seq_len,
            "batch": self.batch,
            "shapes": self.shapes(),
            "memory_bytes_float32": self.memory_float32(),
            "dtype": self.dtype,
            "memory_bytes": self.memory(),
        }

    def text(self) -> str:
        c = self.config
        lines = [self.signature(), ""]
        rows = self.table_rows()
        w = [max(len(r[i]) for r in rows + [("parameter", "shape", "count")]) for i in range(3)]
        lines.append(f"{'parameter':<{w[0]}}  {'shape':<{w[1]}}  {'count':>{w[2]}}")
        lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {n:>{w[2]}}" for a, b, n in rows]
        lines.append("")
        for layer in self.layers():
            lines.append(f"layer {layer['layer']} {layer['direction']:<7}  {self.layer_line(layer)}")
        lines.append(f"total parameters: {self.total:,}")
        lines.append(f"formula: {self.formula()}")
        lines.append("")
        lines.append(f"shapes for seq_len T={self.seq_len}, batch N={self.batch}"
                     + (" (batch_first)" if c.batch_first else "") + ":")
        for name, shape in self.shapes().items():
            lines.append(f"  {name:<7} {tuple(shape)}")
        lines.append("")
        lines.append(f"memory at {self.dtype}:")
        for name, b in self.memory().items():
            lines.append(f"  {name:<10} {format_bytes(b)}")
        return "\n".join(lines)


def _module_dtype(obj) -> str:
    """The dtype name of a module's first parameter ('float32' for a config or no parameters)."""
    params = getattr(obj, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return str(first.dtype).replace("torch.", "") if first is not None else "float32"


def describe(obj, seq_len: int = 1, batch: int = 1, dtype: str | None = None) -> Description:
    """Describe an LSTMConfig or an lstmkit/torch LSTM module. `dtype` (float32, float64,
    float16, bfloat16) sets the memory figures; by default a module's own, else float32."""
    cfg = obj if isinstance(obj, LSTMConfig) else LSTMConfig.from_module(
        obj, "describe()", accepts="an LSTMConfig, lstmkit.LSTM or torch.nn.LSTM")
    for name, v in (("seq_len", seq_len), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "seq_len" else 0):
            raise ValueError(f"{name} must be a {'positive' if name == 'seq_len' else 'non-negative'} integer, got {v!r}")
    dtype = _module_dtype(obj) if dtype is None else dtype
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return Description(cfg, seq_len, batch, dtype)
