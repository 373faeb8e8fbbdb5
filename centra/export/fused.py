"""Layer stacks written directly as ONNX graphs of ONNX Runtime's fused operators.

The dynamo exporter writes attention as MatMul / Softmax / Transpose, and ORT's optimiser, whose
patterns follow transformers' own BERT graphs, does not fuse it: on 6 all-MiniLM-L6-v2 layers at 32 x 40
tokens (2 cores) the exported int8 graph spends about 30% of its time in Softmax and Transpose. centra
owns its layer maths (centra.core.backbone.EncoderLayer), so it writes each layer as the graph ORT's
transformer optimiser aims for: com.microsoft Attention (Q, K and V packed into one weight, the 0/1 mask
as a raw mask_index), SkipLayerNormalization (residual + bias + LayerNorm in one op) and BiasGelu /
FastGelu. Dynamic quantization turns Attention into QAttention.

The graphs take and give what the exported ones do (hidden [batch, sequence, hidden] and attention_mask
[batch, sequence] int64 -> hidden_out or logits) and are checked against PyTorch the same way
(centra.export.onnx). The com.microsoft ops exist only in ONNX Runtime (CPU and CUDA providers, so
Triton's onnxruntime backend too); TensorRT is given the exporter's standard-op graphs instead.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from centra.core.backbone import EncoderConfig, EncoderLayer
from centra.core.task import TaskHead
from centra.errors import CentraError
from centra.runtime.onnx import open_session

OPSET = 20
CONTRIB = "com.microsoft"
CONTRIB_OPSET = 1
IR_VERSION = 10  # what ONNX Runtime 1.2x reads; onnx's newest IR is refused by older runtimes
# ORT's erf GELU and tanh GELU with the bias folded in; relu is written as Add + Relu.
GELU_OPS = {"gelu": "BiasGelu", "gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu"}

# Op types ONNX Runtime's optimiser fuses patterns into (or the exporter emits whole), counted by `fusions`.
FUSED_OPS = ("Attention", "MultiHeadAttention", "QAttention", "EmbedLayerNormalization", "LayerNormalization",
             "SkipLayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Gelu",
             "FastGelu", "BiasGelu", "QuickGelu", "BiasSoftmax", "FusedMatMul", "FusedGemm", "MatMulIntegerToFloat",
             "DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear")

class GraphBuilder:
    """Nodes and weights of one graph; names are prefixed per layer so stacks never collide."""

    def __init__(self):
        self.nodes: list = []
        self.weights: list = []
        self._mask32: str | None = None

    def weight(self, name: str, value: torch.Tensor | np.ndarray) -> str:
        from onnx import numpy_helper

        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        # copy(), not ascontiguousarray: that turns a 0-d index (first_token) into a 1-d one
        self.weights.append(numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, contrib: bool = False, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, domain=CONTRIB if contrib else "",
                                           **attrs))
        return output

    def mask32(self) -> str:
        """The int32 copy of attention_mask that Attention takes as its raw mask (made once)."""
        from onnx import TensorProto

        if self._mask32 is None:
            self._mask32 = self.node("Cast", ["attention_mask"], "attention_mask_int32", to=TensorProto.INT32)
        return self._mask32

    def model(self, name: str, output: str, output_shape: list):
        from onnx import TensorProto, checker, helper

        inputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", "hidden_size"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])]
        outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)]
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.weights)
        model = helper.make_model(graph, ir_version=IR_VERSION, producer_name="centra",
                                  opset_imports=[helper.make_opsetid("", OPSET),
                                                 helper.make_opsetid(CONTRIB, CONTRIB_OPSET)])
        checker.check_model(model)
        return model


def add_layer(b: GraphBuilder, layer: EncoderLayer, cfg: EncoderConfig, x: str, prefix: str) -> str:
    """One post-LayerNorm layer: Attention -> MatMul -> SkipLayerNorm -> MatMul -> (Bias)Gelu -> MatMul ->
    SkipLayerNorm; returns its output's name."""
    p = prefix
    qkv_weight = torch.cat([layer.q.weight.T, layer.k.weight.T, layer.v.weight.T], dim=1)
    qkv_bias = torch.cat([layer.q.bias, layer.k.bias, layer.v.bias])
    context = b.node("Attention", [x, b.weight(f"{p}qkv.weight", qkv_weight), b.weight(f"{p}qkv.bias", qkv_bias),
                                   b.mask32()], f"{p}context", contrib=True, num_heads=cfg.num_heads)
    attended = b.node("MatMul", [context, b.weight(f"{p}o.weight", layer.o.weight.T)], f"{p}o")
    x1 = b.node("SkipLayerNormalization", [attended, x, b.weight(f"{p}ln1.weight", layer.ln1.weight),
                                           b.weight(f"{p}ln1.bias", layer.ln1.bias),
                                           b.weight(f"{p}o.bias", layer.o.bias)],
                f"{p}ln1", contrib=True, epsilon=cfg.layer_norm_eps)
    up = b.node("MatMul", [x1, b.weight(f"{p}fc1.weight", layer.fc1.weight.T)], f"{p}fc1")
    fc1_bias = b.weight(f"{p}fc1.bias", layer.fc1.bias)
    if cfg.hidden_act in GELU_OPS:
        act = b.node(GELU_OPS[cfg.hidden_act], [up, fc1_bias], f"{p}act", contrib=True)
    elif cfg.hidden_act == "relu":
        act = b.node("Relu", [b.node("Add", [up, fc1_bias], f"{p}fc1_bias")], f"{p}act")
    else:
        raise CentraError(f"no fused ONNX form for hidden_act {cfg.hidden_act!r}")
    down = b.node("MatMul", [act, b.weight(f"{p}fc2.weight", layer.fc2.weight.T)], f"{p}fc2")
    return b.node("SkipLayerNormalization", [down, x1, b.weight(f"{p}ln2.weight", layer.ln2.weight),
                                             b.weight(f"{p}ln2.bias", layer.ln2.bias),
                                             b.weight(f"{p}fc2.bias", layer.fc2.bias)],
                  f"{p}ln2", contrib=True, epsilon=cfg.layer_norm_eps)


def segment_model(layers: list[EncoderLayer], cfg: EncoderConfig, name: str):
    """hidden, attention_mask -> hidden_out through `layers`."""
    if not layers:
        raise CentraError(f"{name}: a trunk segment needs at least one layer")
    b = GraphBuilder()
    x = "hidden"
    for k, layer in enumerate(layers):
        x = add_layer(b, layer, cfg, x, f"layer{k}.")
    b.node("Identity", [x], "hidden_out")
    return b.model(name, "hidden_out", ["batch", "sequence", cfg.hidden_size])


def branch_model(head: TaskHead, cfg: EncoderConfig, name: str):
    """hidden, attention_mask -> logits: the task layers, pooling (first token or masked mean), the tanh
    pooler and the classifier (TaskHead.forward in eval mode)."""
    from onnx import TensorProto

    b = GraphBuilder()
    x = "hidden"
    for k, layer in enumerate(head.layers):
        x = add_layer(b, layer, cfg, x, f"layer{k}.")
    if head.spec.pooling == "cls":
        pooled = b.node("Gather", [x, b.weight("first_token", np.array(0, dtype=np.int64))], "pooled", axis=1)
    else:
        keep = b.node("Unsqueeze", [b.node("Cast", ["attention_mask"], "mask_float", to=TensorProto.FLOAT),
                                    b.weight("last_axis", np.array([-1], dtype=np.int64))], "mask_3d")
        axis = b.weight("sequence_axis", np.array([1], dtype=np.int64))
        total = b.node("ReduceSum", [b.node("Mul", [x, keep], "masked"), axis], "masked_sum", keepdims=0)
        count = b.node("ReduceSum", [keep, axis], "token_count", keepdims=0)
        count = b.node("Max", [count, b.weight("one", np.array(1.0, dtype=np.float32))], "token_count_1")
        pooled = b.node("Div", [total, count], "pooled")
    dense = b.node("MatMul", [pooled, b.weight("pooler.weight", head.pooler.weight.T)], "pooler")
    dense = b.node("Tanh", [b.node("Add", [dense, b.weight("pooler.bias", head.pooler.bias)], "pooler_bias")],
                   "pooler_tanh")
    logits = b.node("MatMul", [dense, b.weight("classifier.weight", head.classifier.weight.T)], "classifier")
    b.node("Add", [logits, b.weight("classifier.bias", head.classifier.bias)], "logits")
    return b.model(name, "logits", ["batch", head.spec.num_outputs])


def write_fused(module: nn.Module, cfg: EncoderConfig, path: Path, name: str) -> None:
    """Write the fused graph of a SegmentGraph (.layers) or BranchGraph (.head) module to path."""
    import onnx

    with torch.no_grad():
        model = branch_model(module.head, cfg, name) if hasattr(module, "head") else \
            segment_model(list(module.layers), cfg, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))


def fusions(path: Path) -> dict[str, int]:
    """Op types ONNX Runtime's full graph optimisation (ORT_ENABLE_ALL, the engine's setting) leaves in the
    graph at `path` that are fused or whole-block ops (FUSED_OPS and any com.microsoft op), with counts."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="centra-fusions-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        open_session(Path(path), optimized_path=optimized)
        graph = onnx.load(str(optimized), load_external_data=False).graph
    counts = Counter(n.op_type for n in graph.node if n.op_type in FUSED_OPS or n.domain == "com.microsoft")
    return dict(sorted(counts.items()))


def sum_fusions(graphs) -> dict[str, dict[str, int]]:
    """Per precision, the fused ops of every graph (their entries' "fusions"), summed."""
    total: dict[str, Counter] = {}
    for graph in graphs:
        for precision, counts in (graph.get("fusions") or {}).items():
            total.setdefault(precision, Counter()).update(counts)
    return {p: dict(sorted(c.items())) for p, c in sorted(total.items())}


def total_fusions(paths) -> dict[str, int]:
    total: Counter = Counter()
    for path in paths:
        total.update(fusions(path))
    return dict(sorted(total.items()))
