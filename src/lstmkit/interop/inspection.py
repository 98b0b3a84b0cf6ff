"""Every LSTM in a checkpoint, with its inferred configuration (`lstmkit inspect`, cli/inspect_cmd.py).

Reads, without running any code from the file:
  .safetensors       tensor names and shapes from the header (no torch needed);
  .onnx              a model written by lstmkit.export_onnx: its configuration, from the
                     model's metadata_props ("lstmkit.config"), whatever operators hold it;
                     any other model: ONNX `LSTM` nodes; a node whose input X comes (through
                     Transpose, Reshape, ...) from another LSTM node is that LSTM's next layer;
  anything else      torch.load(weights_only=True): a state_dict, possibly nested
                     ({"model": state_dict, "optimizer": ...}), or a whole module saved with
                     torch.save(model). Classes a whole-module pickle names are replaced by
                     empty stand-ins (the file's code never runs), and the state_dict is
                     read from their _parameters/_buffers/_modules.

An LSTM is found by the names of its parameters (see runtime/infer.py): the prefix in
front of "weight_ih_l0", the rest from the shapes.
"""
from __future__ import annotations

import os
import sys

from ..runtime.infer import find_lstms

KEYS = ("prefix", "input_size", "hidden_size", "num_layers", "bias", "bidirectional", "proj_size", "parameters",
        "variants")
ONNX_CONFIG_KEY = "lstmkit.config"  # onnx_export.CONFIG_KEY (that module needs torch; this one must not)


def row_of(prefix: str, cfg) -> dict:
    """One LSTM as reported: sizes, parameter count, and the variant options not at their default."""
    return {
        "prefix": prefix, "input_size": cfg.input_size, "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers, "bias": cfg.bias, "bidirectional": cfg.bidirectional,
        "proj_size": cfg.proj_size, "parameters": cfg.num_parameters(), "variants": cfg.variant_kwargs(),
    }


class InspectError(Exception):
    """A problem with the file, reported as one line."""


# ---- tensor shapes by name, per file format ------------------------------------------------------
def _safetensors_shapes(path: str) -> tuple[dict, dict]:
    """(tensor shapes by name, the header's metadata)."""
    from ..runtime.load import read_safetensors

    try:
        meta, shapes = read_safetensors(path)
    except ValueError as e:
        raise InspectError(str(e)) from None
    return shapes, meta or {}


def _saved_config(meta: dict):
    """The LSTMConfig lstmkit.save wrote in a .safetensors header (options the weights cannot
    show, e.g. zoneout), or None."""
    import json

    from ..config import LSTMConfig
    from ..runtime.load import CONFIG_KEY

    try:
        return LSTMConfig.from_dict(json.loads(meta[CONFIG_KEY])) if CONFIG_KEY in meta else None
    except (ValueError, TypeError):
        return None  # the weights still tell the sizes


def _torch_shapes(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise InspectError("reading a torch checkpoint needs torch: pip install 'lstmkit[torch]'") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - any unpickling failure: try the whole-module route
        try:
            obj = _load_with_stand_ins(torch, path)
        except Exception:  # noqa: BLE001
            raise InspectError(f"cannot read {path!r} as a torch checkpoint ({short_error(first)})") from None
    shapes: dict = {}
    _collect(torch, obj, "", shapes, depth=0)
    return shapes


class _StandIn:
    """Takes the place of any class a pickle names; keeps the attributes it is given."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass


def _load_with_stand_ins(torch, path: str):
    """torch.load(weights_only=True) with each non-allowlisted global mapped to an empty class."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    stand_ins = [(type(name.rsplit(".", 1)[-1], (_StandIn,), {}), name) for name in names]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True)


def _collect(torch, obj, prefix: str, out: dict, depth: int) -> None:
    """Every tensor under obj, by dotted name: dicts, lists, nn.Modules and stand-ins of modules."""
    if depth > 32:
        return
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = tuple(obj.shape)
    elif isinstance(obj, torch.nn.Module):
        for name, t in obj.state_dict().items():
            out[prefix + name] = tuple(t.shape)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _collect(torch, v, f"{prefix}{k}.", out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _collect(torch, v, f"{prefix}{i}.", out, depth + 1)
    elif isinstance(obj, _StandIn):
        d = obj.__dict__
        if "_parameters" in d and "_modules" in d:  # an nn.Module's pickled state
            for group in ("_parameters", "_buffers"):
                for name, t in (d.get(group) or {}).items():
                    if isinstance(t, torch.Tensor):
                        out[prefix + name] = tuple(t.shape)
            for name, child in (d.get("_modules") or {}).items():
                _collect(torch, child, f"{prefix}{name}.", out, depth + 1)


# ---- ONNX -------------------------------------------------------------------------------------------
_PASS_THROUGH = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Concat", "Dropout", "Cast"}


def _static_shapes(onnx, model) -> dict:
    """Shapes ONNX shape inference fixes completely: weights an exporter computes in the graph
    (e.g. reordered for the LSTM node, left unfolded) instead of storing as initializers."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    except Exception:  # noqa: BLE001 - shape inference is a bonus; initializers still count
        return {}
    shapes = {}
    for info in inferred:
        dims = info.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = tuple(d.dim_value for d in dims)
    return shapes


def _onnx_lstms(path: str) -> list[dict]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise InspectError("reading .onnx files needs the onnx package: pip install onnx") from None
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise InspectError(f"cannot read {path!r} as ONNX ({short_error(e)})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if ONNX_CONFIG_KEY in meta:  # written by lstmkit.export_onnx: the exact configuration
        import json

        from ..config import LSTMConfig

        try:
            cfg = LSTMConfig.from_dict(json.loads(meta[ONNX_CONFIG_KEY]))
        except (ValueError, TypeError) as e:
            raise InspectError(f"{path!r}: bad {ONNX_CONFIG_KEY} metadata ({short_error(e)})") from None
        return [row_of("", cfg)]
    graph = model.graph
    shapes = _static_shapes(onnx, model)
    shapes.update({t.name: tuple(t.dims) for t in graph.initializer})
    for node in graph.node:  # weights may also be Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            shapes[node.output[0]] = tuple(numpy_helper.to_array(node.attribute[0].t).shape)
    producer = {o: n for n in graph.node for o in n.output}

    def lstm_below(name: str, hops: int = 6):
        """The LSTM node that (through shape-only ops) produces tensor `name`, if any."""
        node = producer.get(name)
        while node is not None and hops > 0:
            if node.op_type == "LSTM":
                return node
            if node.op_type not in _PASS_THROUGH or not node.input:
                return None
            node, hops = producer.get(node.input[0]), hops - 1
        return None

    lstm_nodes = [n for n in graph.node if n.op_type == "LSTM"]
    stacks, stack_of = [], {}
    for node in lstm_nodes:  # graph order is topological: a layer's lower layer comes first
        below = lstm_below(node.input[0])
        if below is not None and id(below) in stack_of and stack_of[id(below)][-1] is below:
            stack_of[id(below)].append(node)
            stack_of[id(node)] = stack_of[id(below)]
        else:
            stacks.append([node])
            stack_of[id(node)] = stacks[-1]

    found = []
    for i, stack in enumerate(stacks):
        first = stack[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in first.attribute}
        direction = attrs.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        W = shapes.get(first.input[1])
        if W is None or len(W) != 3:
            raise InspectError(f"ONNX LSTM node {first.name!r}: weight W is not a constant, cannot infer sizes")
        params = 0
        for node in stack:
            for name in node.input[1:4] + node.input[7:8]:  # W, R, B, P
                if name and name in shapes:
                    n = 1
                    for s in shapes[name]:
                        n *= s
                    params += n
        found.append({
            "prefix": first.name or f"LSTM node {i}",
            "input_size": W[2],
            "hidden_size": int(attrs.get("hidden_size", W[1] // 4)),
            "num_layers": len(stack),
            "bias": len(first.input) > 3 and first.input[3] != "",
            "bidirectional": direction == "bidirectional",
            "proj_size": 0,
            "parameters": params,
            "variants": {"peephole": True} if len(first.input) > 7 and first.input[7] else {},
        })
    return found


# ---- the command -----------------------------------------------------------------------------------
def find_in_file(path: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """(the LSTMs in `path` as dicts with KEYS, rejected candidates as (prefix, reason))."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InspectError(f"no such file: {path}")
    if not os.path.isfile(path):
        raise InspectError(f"not a file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        return _onnx_lstms(path), []
    saved = None
    if ext == ".safetensors":
        shapes, meta = _safetensors_shapes(path)
        saved = _saved_config(meta)
    else:
        shapes = _torch_shapes(path)
    found, rejected = find_lstms(shapes)
    rows = []
    for f in found:
        same = saved is not None and f.prefix == "" and saved.param_shapes() == f.config.param_shapes()
        rows.append(row_of(f.prefix, saved if same else f.config))
    return rows, rejected


def short_error(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    first = msg[0].split(". ")[0] if msg else ""
    return f"{type(e).__name__}: {first}"[:160]
