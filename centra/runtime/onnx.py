"""ONNX Runtime engine: the merged model as a set of ONNX graphs, run with the torch engine's savings.

The layout (`graph_layout`) is one graph for the embeddings, one per trunk segment between consecutive
attach layers, and one per task branch, so a call runs only the trunk its tasks need and only their
branches, and each branch runs only on the rows that asked for it (rows leave the trunk at the attach
layer of the deepest task they asked for), exactly as `MergedModel.forward_rows` does.

`centra merge --engine onnx` writes the graphs (centra.export.onnx) and records them in the manifest's
"engine" field; the files are hashed with the rest of the version. The torch files stay in the version
too: `reference` is the torch MergedModel, which `verify` builds its standalone models from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from centra.core.backbone import EncoderConfig
from centra.core.graph import MergedModel, tasks_by_layer
from centra.core.task import TaskSpec
from centra.errors import CentraError

ENGINE_NAME = "onnx"
PRECISIONS = ("fp32", "int8")
PROVIDER = "CPUExecutionProvider"
EMBEDDINGS = "embeddings"


def segment_name(first: int, last: int) -> str:
    return f"layers_{first}-{last}"


def branch_name(task: str) -> str:
    return f"task_{task}"


def graph_layout(specs: dict[str, TaskSpec] | list[TaskSpec]) -> list[dict]:
    """The graphs of a merged model: embeddings, trunk segments ending at each attach layer (layers
    first..last, 1-based, inclusive), one branch per task. Segments end at every attach layer of the
    model, so any call's early exits (which happen only at its own tasks' attach layers) fall on one."""
    specs = list(specs.values()) if isinstance(specs, dict) else list(specs)
    graphs: list[dict] = [{"name": EMBEDDINGS, "kind": "embeddings"}]
    start = 0
    for end in sorted({s.attach_layer for s in specs} - {0}):
        graphs.append({"name": segment_name(start + 1, end), "kind": "segment", "first": start + 1, "last": end})
        start = end
    graphs += [{"name": branch_name(s.name), "kind": "branch", "task": s.name} for s in specs]
    return graphs


def session_options(threads: int | None = None, optimized_path: Path | None = None):
    """Full graph optimisation; threads set per session (default: torch's), and no spinning, since
    several sessions share the machine's cores and take turns."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
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


class OnnxRunner:
    """The Runner protocol over ONNX Runtime sessions, one per graph of `graph_layout`."""

    def __init__(self, specs: dict[str, TaskSpec], cfg: EncoderConfig, sessions: dict[str, object],
                 layout: list[dict], precision: str, reference: MergedModel | None = None):
        self.specs = specs
        self.cfg = cfg
        self.sessions = sessions
        self.precision = precision
        self.reference = reference
        # trunk segments by the layer they start after: 0 -> the first segment, ...
        self.segments = {g["first"] - 1: (g["name"], g["last"]) for g in layout if g["kind"] == "segment"}
        missing = [g["name"] for g in layout if g["name"] not in sessions]
        if missing:
            raise CentraError(f"ONNX engine: no session for graph {missing[0]!r}")

    @classmethod
    def load(cls, folder: Path, manifest: dict, reference: MergedModel, precision: str | None = None,
             threads: int | None = None, warm: bool = True) -> OnnxRunner:
        """Sessions for a version folder's graphs (the manifest's "engine" field), warmed up."""
        folder = Path(folder)
        info = manifest.get("engine")
        source = folder / "manifest.json"
        if not isinstance(info, dict) or info.get("name") != ENGINE_NAME:
            raise CentraError(f"{source}: this version has no ONNX graphs (merge with --engine onnx)")
        precision = precision or info.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise CentraError(f"{source}: unknown ONNX precision {precision!r} (known: {', '.join(PRECISIONS)})")
        layout = graph_layout(reference.specs)
        graphs = {g.get("name"): g for g in info.get("graphs", []) if isinstance(g, dict)}
        sessions = {}
        for graph in layout:
            entry = graphs.get(graph["name"], {})
            rel = entry.get(precision)
            if not isinstance(rel, str):
                raise CentraError(f"{source}: malformed engine field (no {precision} file for graph "
                                  f"{graph['name']!r})")
            if "files" in manifest and rel not in manifest["files"]:  # only files the manifest hashed
                raise CentraError(f"{source}: graph {graph['name']!r} names {rel!r}, not a file of this version")
            sessions[graph["name"]] = open_session(folder / rel, threads)
        runner = cls(reference.specs, reference.cfg, sessions, layout, precision, reference)
        if warm:
            runner.warm_up()
        return runner

    @property
    def runtime(self) -> str:
        return f"onnxruntime {self.precision}"

    def eval(self) -> OnnxRunner:  # the Engine calls model.eval(); sessions have no training mode
        return self

    # What `verify` and the demo read from a torch MergedModel: the torch files of the same version.
    @property
    def heads(self):
        return self._reference().heads

    @property
    def embeddings(self):
        return self._reference().embeddings

    @property
    def trunk(self):
        return self._reference().trunk

    def _reference(self) -> MergedModel:
        if self.reference is None:
            raise CentraError("this ONNX engine was built without its torch reference")
        return self.reference

    def depth_for(self, names: list[str]) -> int:
        return max((self.specs[n].attach_layer for n in names), default=0)

    def run_graph(self, name: str, **inputs: np.ndarray) -> np.ndarray:
        """One graph on one batch (the single place sessions run: tests count calls here)."""
        return self.sessions[name].run(None, inputs)[0]

    def warm_up(self) -> None:
        """Every graph once, so the first real call pays no allocation or kernel-selection cost."""
        ids = np.full((1, 2), self.cfg.pad_token_id + 1, dtype=np.int64)
        ones = np.ones((1, 2), dtype=np.int64)
        hidden = self.run_graph(EMBEDDINGS, input_ids=ids, token_type_ids=np.zeros_like(ids))
        for name, _ in self.segments.values():
            self.run_graph(name, hidden=hidden, attention_mask=ones)
        for task in self.specs:
            self.run_graph(branch_name(task), hidden=hidden, attention_mask=ones)

    def forward_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                     wants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """MergedModel.forward_rows over the graphs: the trunk once, segment by segment and only as deep
        as the deepest task asked for; each branch on its rows; rows drop out of the trunk once no task
        they asked for attaches deeper."""
        by_layer = tasks_by_layer(self.specs, wants)
        rows = {name: np.asarray(r, dtype=np.int64) for name, r in wants.items()}
        batch = input_ids.shape[0]
        position = np.arange(batch)  # batch row -> its row in the live arrays (-1: dropped)
        mask = np.ascontiguousarray(attention_mask.numpy(), dtype=np.int64)
        hidden = self.run_graph(EMBEDDINGS, input_ids=np.ascontiguousarray(input_ids.numpy(), dtype=np.int64),
                                token_type_ids=np.ascontiguousarray(token_type_ids.numpy(), dtype=np.int64))
        out: dict[str, torch.Tensor] = {}
        k = 0
        while True:
            for name in by_layer.get(k, ()):
                live = position[rows[name]]
                if len(live) == hidden.shape[0] and np.array_equal(live, np.arange(len(live))):
                    h, m = hidden, mask
                else:
                    h, m = hidden[live], mask[live]
                out[name] = torch.from_numpy(self.run_graph(branch_name(name), hidden=h, attention_mask=m))
            deeper = [rows[n] for layer, names in by_layer.items() if layer > k for n in names]
            if not deeper:
                return out
            needed = np.unique(np.concatenate(deeper))
            if len(needed) < hidden.shape[0]:  # rows no deeper task wants leave the trunk here
                keep = position[needed]
                hidden, mask = hidden[keep], mask[keep]
                position = np.full(batch, -1, dtype=np.int64)
                position[needed] = np.arange(len(needed))
            if k not in self.segments:
                raise CentraError(f"ONNX engine: no trunk segment starts after layer {k}")
            name, k = self.segments[k]
            hidden = self.run_graph(name, hidden=hidden, attention_mask=mask)
