"""ONNX Runtime engine: the merged model as a set of ONNX graphs, run with the torch engine's savings.

The graphs follow centra.runtime.graphs.graph_layout (embeddings, trunk segments, one branch per
task), run by GraphRunner with the torch engine's savings; this module supplies the sessions.

`centra merge --engine onnx` writes the graphs (centra.export.onnx) and records them in the manifest's
"engine" field; the files are hashed with the rest of the version. The torch files stay in the version
too: `reference` is the torch MergedModel, which `verify` builds its standalone models from; loaded from a
`Version`, it is built only when first asked for, so a served engine holds its graphs and no fp32 copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from centra.core import PRECISIONS as ENGINE_PRECISIONS
from centra.core.backbone import EncoderConfig
from centra.core.graph import MergedModel
from centra.core.manifest import EngineInfo
from centra.core.task import TaskSpec
from centra.core.versions import Version
from centra.errors import CentraError
from centra.runtime.graphs import GraphRunner, check_engine_field

ENGINE_NAME = "onnx"
PRECISIONS = ENGINE_PRECISIONS[ENGINE_NAME]
ONNX_DIR = "onnx"  # a version's ONNX graphs: onnx/<precision>/<graph>.onnx
PROVIDER = "CPUExecutionProvider"


# Measured on 32 one- or two-layer int8 branches of all-MiniLM-L6-v2 (2 cores): a session with its own
# memory arena held 6.2 MB after a run for a 3.6 MB graph, and the arenas grew 300 MB over the engine's
# 40 sessions on 64 texts; without an arena, 5.7 MB (the graph's weights plus about 1 MB of kernels and
# plans) at the same speed. A session allocates from the process's heap (the server trims it after
# reloads, centra.serve.memory). ONNX Runtime's global thread pool (one for every session) was measured
# too, on 100 tasks: 30 MB less, but 1.5x slower for all tasks and 3.6x for one task on a busy machine
# (its pool spins, and its spinning cannot be turned off from Python), and process-wide: once made, ONNX
# Runtime refuses every other session of the process that has a pool of its own. Sessions keep theirs.


def session_options(threads: int | None = None, optimized_path: Path | None = None):
    """Full graph optimisation, sequential execution, no memory arena of its own; threads set per
    session (default: torch's), and no spinning, since several sessions share the machine's cores and
    take turns."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = False
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: ORT's warnings go to stderr, not a log
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return opts


def open_session(path: Path, threads: int | None = None, optimized_path: Path | None = None):
    """An InferenceSession on the CPU provider, refused (one line naming the file) when the graph does
    not load or ONNX Runtime did not give the provider asked for."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(threads, optimized_path),
                                       providers=[PROVIDER])
    except Exception as exc:  # ORT raises its own exception types for missing or invalid graphs
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CentraError(f"{path}: cannot load the ONNX graph ({first})") from None
    got = session.get_providers()
    if not got or got[0] != PROVIDER:
        raise CentraError(f"{path}: ONNX Runtime runs it on {got}, not on {PROVIDER}")
    return session


class OnnxRunner(GraphRunner):
    """The Runner protocol over ONNX Runtime sessions, one per graph of `graph_layout`."""

    def __init__(self, specs: dict[str, TaskSpec], cfg: EncoderConfig, sessions: dict[str, object],
                 layout: list[dict], precision: str, reference: MergedModel | Version | None = None):
        super().__init__(specs, cfg, layout, precision, reference)
        self.sessions = sessions
        missing = [g["name"] for g in layout if g["name"] not in sessions]
        if missing:
            raise CentraError(f"ONNX engine: no session for graph {missing[0]!r}")

    @classmethod
    def load(cls, folder: Path, info: EngineInfo | None, reference: MergedModel | Version,
             precision: str | None = None,
             threads: int | None = None, warm: bool = True, files: Mapping[str, str] | None = None) -> OnnxRunner:
        """Sessions for a version folder's graphs (`info`: its manifest's engine field; `files`: the files
        its manifest hashed, the only ones a graph may name), warmed up. `reference`: the torch model, or
        the Version read from `folder` (the specs and config; the torch weights load when first needed)."""
        precision = precision or (info.precision if info is not None else None) or "fp32"
        check_engine_field(folder, info, ENGINE_NAME, "ONNX graphs", precision, PRECISIONS)
        return cls.open(folder, info, precision, lambda path: open_session(path, threads), reference.specs,
                        reference.cfg, precision, reference, warm, files)

    @property
    def runtime(self) -> str:
        return f"onnxruntime {self.precision}"

    def run_graph(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        feeds = {key: value.numpy() for key, value in inputs.items()}  # CPU tensors: no copy
        return torch.from_numpy(self.sessions[name].run(None, feeds)[0])
