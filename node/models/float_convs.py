"""A dynamically quantized ONNX graph's convolutions, rewritten for onnxruntime's fast CPU kernels.

The offline pack's Kokoro is quantized dynamically (onnxruntime's ``quantize_dynamic``): each
convolution is ``DynamicQuantizeLinear -> ConvInteger -> [Add int32 bias] -> Cast -> Mul(scale)``.
On CPU onnxruntime runs ``ConvInteger`` through a generic im2col kernel, and its blocked (NCHWc)
float kernels only take 2-D convolutions, so Kokoro's 1-D vocoder convolutions, most of a
synthesis, never reach them. :func:`float_convs` gives every such convolution its weights
dequantized (the same int8 values times their scale: nothing the pack does not hold) and runs it
as a float 2-D convolution of height 1 between an ``Unsqueeze`` and a ``Squeeze``; onnxruntime then
lays it out NCHWc. The activations are no longer quantized on the way in, so the output is not
bit-identical to the int8 graph's (it is closer to the float model's). Measured on the 2-core
machine, one thread: 2.55 -> 2.13 s for 4.5 s of speech; the weights take 256 MB instead of 92.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_AXIS = "float_convs_axis_2"  # the initializer [2] the Unsqueeze/Squeeze pairs share


def float_convs(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place; returns how many convolutions now run as float 2-D ones."""
    graph = model.graph
    _dequantize_convs(graph)
    count = _convs_as_2d(graph)
    _prune(graph)
    return count


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _only(nodes: list[onnx.NodeProto], op: str, where: str) -> onnx.NodeProto:
    if len(nodes) != 1 or nodes[0].op_type != op:
        raise ValueError(
            f"{where}: expected one {op} after it, found {[n.op_type for n in nodes]}; this is "
            "not the pattern onnxruntime's quantize_dynamic writes"
        )
    return nodes[0]


def _dequantize_convs(graph: onnx.GraphProto) -> None:
    """Each ConvInteger chain becomes one float Conv writing the chain's float output."""
    inits = {t.name: t for t in graph.initializer}
    producers, consumers = _producers(graph), _consumers(graph)
    replace: dict[str, onnx.NodeProto] = {}  # final Mul's output -> the Conv that takes its place
    for node in graph.node:
        if node.op_type != "ConvInteger":
            continue
        quantize = producers.get(node.input[0])
        if len(node.input) != 4 or quantize is None or quantize.op_type != "DynamicQuantizeLinear":
            raise ValueError(
                f"{node.name}: a ConvInteger whose input is not quantized dynamically (with zero "
                "points); only graphs from onnxruntime's quantize_dynamic can be rewritten"
            )
        w_q, w_zero = node.input[1], node.input[3]
        after = consumers[node.output[0]]
        bias = None
        if len(after) == 1 and after[0].op_type == "Add":
            bias = _float_bias(after[0], node.output[0], producers, inits)
            after = consumers[after[0].output[0]]
        cast = _only(after, "Cast", node.name)
        mul = _only(consumers[cast.output[0]], "Mul", node.name)
        scale_mul = producers[next(i for i in mul.input if i != cast.output[0])]
        w_scale = [i for i in scale_mul.input if i in inits]
        if scale_mul.op_type != "Mul" or len(w_scale) != 1:
            raise ValueError(f"{node.name}: cannot find its weight scale")
        weights = _dequantized(inits[w_q], inits[w_zero], inits[w_scale[0]])
        graph.initializer.append(numpy_helper.from_array(weights, w_q + "_float"))
        conv = helper.make_node(
            "Conv",
            [quantize.input[0], w_q + "_float", *([bias] if bias else [])],
            list(mul.output),
            name=(node.name or mul.output[0]) + "_float",
        )
        conv.attribute.extend(node.attribute)
        replace[mul.output[0]] = conv
    # the Conv takes the Mul's place: its input (the quantizer's) is computed before that
    nodes = [replace.get(n.output[0], n) if n.output else n for n in graph.node]
    graph.ClearField("node")
    graph.node.extend(nodes)


def _float_bias(
    add: onnx.NodeProto,
    conv_out: str,
    producers: dict[str, onnx.NodeProto],
    inits: dict[str, onnx.TensorProto],
) -> str:
    """The float bias behind the int32 one (bias / scale, floored, cast, reshaped)."""
    name = next(i for i in add.input if i != conv_out)
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type not in ("Reshape", "Cast", "Floor", "Div"):
            raise ValueError(f"{add.name}: cannot trace its bias back to a float initializer")
        name = node.input[0]
    if inits[name].data_type != onnx.TensorProto.FLOAT:
        raise ValueError(f"{add.name}: bias {name} is not float")
    return name


def _dequantized(
    w_q: onnx.TensorProto, zero: onnx.TensorProto, scale: onnx.TensorProto
) -> np.ndarray:
    w = numpy_helper.to_array(w_q).astype(np.float32)
    z = numpy_helper.to_array(zero).astype(np.float32)
    s = numpy_helper.to_array(scale).astype(np.float32)
    if s.size > 1:  # per output channel
        s = s.reshape(-1, *([1] * (w.ndim - 1)))
        z = z.reshape(-1, *([1] * (w.ndim - 1)))
    return ((w - z) * s).astype(np.float32)


def _convs_as_2d(graph: onnx.GraphProto) -> int:
    """Each 1-D float Conv with constant weights becomes Unsqueeze -> 2-D Conv -> Squeeze."""
    inits = {t.name: t for t in graph.initializer}
    graph.initializer.append(numpy_helper.from_array(np.array([2], dtype=np.int64), _AXIS))
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        w = inits.get(node.input[1]) if node.op_type == "Conv" else None
        if w is None or len(w.dims) != 3:
            nodes.append(node)
            continue
        weights = numpy_helper.to_array(w)
        graph.initializer.append(numpy_helper.from_array(weights[:, :, None, :], w.name + "_2d"))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ValueError(f"{node.name}: auto_pad is not supported here")
        pads = attrs.get("pads", [0, 0])
        out = node.output[0]  # unique in the graph, unlike node names (which may be empty)
        x4, y4 = out + "_x4d", out + "_y4d"
        nodes += [
            helper.make_node("Unsqueeze", [node.input[0], _AXIS], [x4], name=out + "_unsq"),
            helper.make_node(
                "Conv",
                [x4, w.name + "_2d", *node.input[2:]],
                [y4],
                name=out + "_2d",
                kernel_shape=[1, weights.shape[2]],
                dilations=[1, attrs.get("dilations", [1])[0]],
                strides=[1, attrs.get("strides", [1])[0]],
                pads=[0, pads[0], 0, pads[1]],
                group=attrs.get("group", 1),
            ),
            helper.make_node("Squeeze", [y4, _AXIS], list(node.output), name=out + "_sq"),
        ]
        count += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    return count


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers nothing reads any more (the int8 chains)."""
    while True:
        wanted = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        keep = [n for n in graph.node if any(o in wanted for o in n.output)]
        if len(keep) == len(graph.node):
            break
        graph.ClearField("node")
        graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    inits = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
