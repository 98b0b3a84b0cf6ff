"""Parameter accounting: every tensor, per-layer totals, the formula, shapes and memory.

`describe(config_or_module, seq_len=, batch=)` returns a Description (`.text()` for
people, `.to_dict()` for programs); `lstmkit params ...` (cli/params.py) is its command line.
Torch-free: it works from an LSTMConfig (a module is read through its `.config`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .config import LSTMConfig

FLOAT32_BYTES = 4


def _count(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _fmt_bytes(n: int) -> str:
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

    def memory_float32(self) -> dict:
        sh = self.shapes()
        return {
            "parameters": self.total * FLOAT32_BYTES,
            "gradients": self.total * FLOAT32_BYTES,
            "input": _count(sh["input"]) * FLOAT32_BYTES,
            "output": _count(sh["output"]) * FLOAT32_BYTES,
            "state": 2 * (_count(sh["h0"]) + _count(sh["c0"])) * FLOAT32_BYTES,  # h0, c0, h_n, c_n
        }

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
        }

    def text(self) -> str:
        c = self.config
        # nn.LSTM's own arguments always; lstmkit's variant options only when set
        core = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size")
        defaults = {f.name: f.default for f in fields(LSTMConfig)}
        args = ", ".join(f"{k}={v}" for k, v in c.to_dict().items() if k in core or v != defaults.get(k))
        lines = [f"LSTM({args})", ""]
        rows = [(t["name"], "(" + ", ".join(map(str, t["shape"])) + ")", f"{t['count']:,}") for t in self.tensors()]
        w = [max(len(r[i]) for r in rows + [("parameter", "shape", "count")]) for i in range(3)]
        lines.append(f"{'parameter':<{w[0]}}  {'shape':<{w[1]}}  {'count':>{w[2]}}")
        lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {n:>{w[2]}}" for a, b, n in rows]
        lines.append("")
        for layer in self.layers():
            lines.append(f"layer {layer['layer']} {layer['direction']:<7}  {layer['formula']} = {layer['count']:,}")
        lines.append(f"total parameters: {self.total:,}")
        lines.append(f"formula: {self.formula()}")
        lines.append("")
        lines.append(f"shapes for seq_len T={self.seq_len}, batch N={self.batch}"
                     + (" (batch_first)" if c.batch_first else "") + ":")
        for name, shape in self.shapes().items():
            lines.append(f"  {name:<7} {tuple(shape)}")
        lines.append("")
        lines.append("memory at float32:")
        for name, b in self.memory_float32().items():
            lines.append(f"  {name:<10} {_fmt_bytes(b)}")
        return "\n".join(lines)


def describe(obj, seq_len: int = 1, batch: int = 1) -> Description:
    """Describe an LSTMConfig or an lstmkit/torch LSTM module."""
    if isinstance(obj, LSTMConfig):
        cfg = obj
    elif hasattr(obj, "config") and isinstance(obj.config, LSTMConfig):
        cfg = obj.config
    elif all(hasattr(obj, a) for a in ("input_size", "hidden_size", "num_layers", "bias", "bidirectional")):
        cfg = LSTMConfig(obj.input_size, obj.hidden_size, obj.num_layers, obj.bias,
                         bool(getattr(obj, "batch_first", False)), 0.0, bool(obj.bidirectional),
                         int(getattr(obj, "proj_size", 0)))
    else:
        raise TypeError(f"describe() takes an LSTMConfig or an LSTM module, got {type(obj).__name__}")
    for name, v in (("seq_len", seq_len), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "seq_len" else 0):
            raise ValueError(f"{name} must be a {'positive' if name == 'seq_len' else 'non-negative'} integer, got {v!r}")
    return Description(cfg, seq_len, batch)
