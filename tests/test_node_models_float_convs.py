"""The int8 -> float-convolution rewrite on a small graph quantized by onnxruntime itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as rt
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from node.models.float_convs import float_convs


def conv_net(weights: list[np.ndarray], bias: list[np.ndarray | None]) -> onnx.ModelProto:
    """x [1, C, T] through 1-D convolutions (dilated, padded, one without bias) and a LeakyRelu."""
    nodes, inits, name = [], [], "x"
    for i, (w, b) in enumerate(zip(weights, bias, strict=True)):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inputs = [name, f"w{i}"]
        if b is not None:
            inits.append(numpy_helper.from_array(b, f"b{i}"))
            inputs.append(f"b{i}")
        k, d = w.shape[2], i + 1
        pad = d * (k - 1) // 2
        nodes.append(
            helper.make_node(
                "Conv", inputs, [f"c{i}"], kernel_shape=[k], dilations=[d], pads=[pad, pad]
            )
        )
        nodes.append(helper.make_node("LeakyRelu", [f"c{i}"], [f"y{i}"], alpha=0.1))
        name = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, "T"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 8, "T"])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = rt.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_quantized_convs_become_float_2d_convs_with_the_dequantized_weights(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(7)
    weights = [rng.normal(0, 0.3, (8, 8, k)).astype(np.float32) for k in (3, 7, 5)]
    bias = [
        rng.normal(0, 0.1, 8).astype(np.float32),
        None,
        rng.normal(0, 0.1, 8).astype(np.float32),
    ]
    onnx.save(conv_net(weights, bias), tmp_path / "float.onnx")
    quantize_dynamic(tmp_path / "float.onnx", tmp_path / "int8.onnx", weight_type=QuantType.QUInt8)
    quantized = onnx.load(tmp_path / "int8.onnx")
    assert sum(n.op_type == "ConvInteger" for n in quantized.graph.node) == 3

    # what the int8 graph holds: its weights, dequantized
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    held = []
    for node in (n for n in quantized.graph.node if n.op_type == "ConvInteger"):
        w_q, zero = inits[node.input[1]], inits[node.input[3]]
        scale = inits[node.input[1].removesuffix("_quantized") + "_scale"]
        held.append(((w_q.astype(np.float32) - zero) * scale).astype(np.float32))
    reference = conv_net(held, bias)

    rewritten = onnx.load(tmp_path / "int8.onnx")
    assert float_convs(rewritten) == 3
    ops = [n.op_type for n in rewritten.graph.node]
    assert "ConvInteger" not in ops and "DynamicQuantizeLinear" not in ops
    assert ops.count("Conv") == 3 and ops.count("Unsqueeze") == 3 and ops.count("Squeeze") == 3
    assert all(len(t.dims) != 3 for t in rewritten.graph.initializer)  # no 1-D kernels left
    onnx.checker.check_model(rewritten)

    x = rng.normal(0, 1, (1, 8, 200)).astype(np.float32)
    out = run(rewritten, x)
    assert out.shape == (1, 8, 200)
    np.testing.assert_allclose(out, run(reference, x), rtol=1e-4, atol=1e-5)
    # and the float graph that was quantized agrees up to the weights' 8-bit rounding
    original = run(conv_net(weights, bias), x)
    assert np.abs(out - original).max() < 0.05 * np.abs(original).max()


@pytest.mark.fast
def test_a_graph_not_quantized_dynamically_is_refused_by_name() -> None:
    w = numpy_helper.from_array(np.zeros((4, 4, 3), dtype=np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("ConvInteger", ["xq", "w"], ["y"], name="lonely")],
        "bad",
        [helper.make_tensor_value_info("xq", TensorProto.UINT8, [1, 4, 10])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 4, 8])],
        [w],
    )
    with pytest.raises(ValueError, match="lonely: a ConvInteger whose input is not quantized"):
        float_convs(helper.make_model(graph))
