"""The core: backbone, task folder, merged graph, tokens, answers, overhead. Imports only errors and io.

The names every layer shares and that the CLI needs while it builds its parsers live here, where
importing them costs nothing (the modules of the core import torch)."""

from collections.abc import Sequence

from centra.errors import FieldError, Name

DEFAULT_TASKS_DIR = "tasks"  # the folder of task folders, unless a command is told another
KINDS = ("multiclass", "multilabel", "regression")
INPUTS = ("single", "pair")
POOLINGS = ("mean", "cls")
ENGINES = ("torch", "onnx", "tensorrt")  # the runtimes a merged version runs on (centra.runtime)
PRECISIONS = {"onnx": ("fp32", "int8"), "tensorrt": ("fp32", "fp16", "int8")}  # of each exported engine
INT8_FP32 = ("ffn-out",)  # node groups an ONNX int8 graph may keep in fp32 (centra.export.int8.FP32_NODES)


def check_int8_fp32(groups: Sequence[str] | str | None) -> tuple[str, ...]:
    """The node groups to keep in fp32 in ONNX int8 graphs, each a known one (INT8_FP32), sorted and once
    each: the form the reuse key and the check's report record (the same choice given in another order is
    the same key)."""
    groups = (groups,) if isinstance(groups, str) else tuple(groups or ())
    for group in groups:
        if group not in INT8_FP32:
            raise FieldError(Name("int8_fp32"), f" {group!r} is unknown (known: {', '.join(INT8_FP32)})")
    return tuple(sorted(set(groups)))
