"""What every graph engine shares: the layout of a merged model as graphs, and running it with the torch
engine's savings.

The layout (`graph_layout`) is one graph for the embeddings, one per trunk segment between consecutive
attach layers, and one per task branch, so a call runs only the trunk its tasks need and only their
branches, and each branch runs only on the rows that asked for it (rows leave the trunk at the attach
layer of the deepest task they asked for), exactly as `MergedModel.forward_rows` does. `GraphRunner`
implements that walk once over torch tensors (on the CPU for ONNX Runtime, on the GPU for TensorRT); an
engine supplies `run_graph`, one graph on one batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from centra.core.backbone import EncoderConfig
from centra.core.graph import MergedModel, TrunkRows
from centra.core.manifest import EngineInfo
from centra.core.merge import load_merged
from centra.core.shadow import is_candidate, task_of
from centra.core.task import TaskSpec
from centra.core.versions import Version
from centra.errors import CentraError

EMBEDDINGS = "embeddings"


def segment_name(first: int, last: int) -> str:
    return f"layers_{first}-{last}"


def branch_name(task: str) -> str:
    """The graph of a task's branch, or of a candidate key's (centra.core.shadow): candidate_<task>."""
    return f"candidate_{task_of(task)}" if is_candidate(task) else f"task_{task}"


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


def check_engine_field(folder: Path, info: EngineInfo | None, name: str, what: str, precision: str | None,
                       precisions: tuple[str, ...]) -> None:
    """A version's engine field names engine `name` (its graphs: `what`) in one of its `precisions`, or a
    one-line refusal naming the manifest."""
    source = Path(folder) / "manifest.json"
    if info is None or info.name != name:
        raise CentraError(f"{source}: this version has no {what} (merge with engine {name!r})")
    if precision not in precisions:
        raise CentraError(f"{source}: unknown {what.split()[0]} precision {precision!r} "
                          f"(known: {', '.join(precisions)})")


def layout_files(folder: Path, info: EngineInfo, layout: list[dict], key: str,
                 files: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Per graph of the layout, the file the engine field `info` names under `key` ("fp32", "plan", ...),
    refused in one line when missing or, with the manifest's `files`, not a file the manifest hashed."""
    source = Path(folder) / "manifest.json"
    named = info.files(key)
    found = {}
    for graph in layout:
        rel = named.get(graph["name"])
        if rel is None:
            raise CentraError(f"{source}: malformed engine field (no {key} file for graph {graph['name']!r})")
        if files is not None and rel not in files:  # only files the manifest hashed
            raise CentraError(f"{source}: graph {graph['name']!r} names {rel!r}, not a file of this version")
        found[graph["name"]] = Path(folder) / rel
    return found


class GraphRunner:
    """The Runner protocol over the graphs of `graph_layout`; subclasses run one graph (`run_graph`)."""

    device = torch.device("cpu")  # where run_graph takes and gives tensors

    def __init__(self, specs: dict[str, TaskSpec], cfg: EncoderConfig, layout: list[dict], precision: str,
                 reference: MergedModel | Version | None = None):
        self.specs = specs
        self.cfg = cfg
        self.layout = layout
        self.precision = precision
        self._reference_source = reference  # a Version: the torch model is loaded when first asked for
        # trunk segments by the layer they start after: 0 -> the first segment, ...
        self.segments = {g["first"] - 1: (g["name"], g["last"]) for g in layout if g["kind"] == "segment"}

    @classmethod
    def open(cls, folder: Path, info: EngineInfo, key: str, open_graph: Callable[[Path], object],
             specs: dict[str, TaskSpec], cfg: EncoderConfig, precision: str,
             reference: MergedModel | Version | None = None,
             warm: bool = True, files: Mapping[str, str] | None = None, layout: list[dict] | None = None,
             **kwargs) -> GraphRunner:
        """A runner over the graphs of `specs`' layout in `folder`: each the file the engine field `info`
        names under `key` (layout_files), opened by `open_graph(path)` (a session, a plan), warmed up.
        `layout`: a part of the version's layout that covers `specs` (default: the layout of `specs`)."""
        layout = layout or graph_layout(specs)
        graphs = {name: open_graph(path) for name, path in layout_files(folder, info, layout, key, files).items()}
        runner = cls(specs, cfg, graphs, layout, precision, reference, **kwargs)
        if warm:
            runner.warm_up()
        return runner

    def eval(self):  # the Engine calls model.eval(); graphs have no training mode
        return self

    # What `verify` and the demo read from a torch MergedModel: the torch files of the same version,
    # loaded when first asked for (a served engine never holds fp32 torch weights beside its graphs).
    @property
    def heads(self):
        return self._reference().heads

    @property
    def embeddings(self):
        return self._reference().embeddings

    @property
    def trunk(self):
        return self._reference().trunk

    @property
    def reference_loaded(self) -> bool:
        return isinstance(self._reference_source, MergedModel)

    @property
    def reference(self) -> MergedModel | None:
        """The torch MergedModel of the same version (None: built without one)."""
        if isinstance(self._reference_source, Version):  # every file hashed again: the folder may have changed
            self._reference_source = load_merged(self._reference_source.folder)[1]
        return self._reference_source

    def _reference(self) -> MergedModel:
        if self.reference is None:
            raise CentraError(f"this {type(self).__name__} was built without its torch reference")
        return self.reference

    def depth_for(self, names: list[str]) -> int:
        return max((self.specs[n].attach_layer for n in names), default=0)

    def detour(self, key: str, layer: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A candidate branch on its rows' hidden states at trunk `layer` (a segment end): the trunk
        segments up to its attach layer (one ends there: the layout cuts at every branch's), then its branch."""
        while layer < self.specs[key].attach_layer:
            if layer not in self.segments:
                raise CentraError(f"{type(self).__name__}: no trunk segment starts after layer {layer}")
            name, layer = self.segments[layer]
            hidden = self.run_graph(name, hidden=hidden, attention_mask=mask)
        return self.run_graph(branch_name(key), hidden=hidden, attention_mask=mask)

    def run_graph(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        """One graph on one batch (the single place graphs run: tests count calls here)."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """Every graph once, so the first real call pays no allocation or kernel-selection cost."""
        ids = torch.full((1, 2), self.cfg.pad_token_id + 1, dtype=torch.long, device=self.device)
        ones = torch.ones((1, 2), dtype=torch.long, device=self.device)
        hidden = self.run_graph(EMBEDDINGS, input_ids=ids, token_type_ids=torch.zeros_like(ids))
        for name, _ in self.segments.values():
            self.run_graph(name, hidden=hidden, attention_mask=ones)
        for task in self.specs:
            self.run_graph(branch_name(task), hidden=hidden, attention_mask=ones)

    def forward_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                     wants: dict[str, torch.Tensor], spent: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        """MergedModel.forward_rows over the graphs: the trunk once, segment by segment and only as deep
        as the deepest task asked for; each branch on its rows; rows drop out of the trunk once no task
        they asked for attaches deeper; a candidate key on its detour (`spent`: its seconds added).
        Logits come back on the CPU."""
        device = self.device
        rows = TrunkRows(self.specs, wants, input_ids.shape[0])
        mask = attention_mask.to(device=device, dtype=torch.long).contiguous()
        hidden = self.run_graph(EMBEDDINGS, input_ids=input_ids.to(device=device, dtype=torch.long).contiguous(),
                                token_type_ids=token_type_ids.to(device=device, dtype=torch.long).contiguous())
        out: dict[str, torch.Tensor] = {}
        k = 0
        while True:
            for name, live in rows.branches(k):
                if live is None:
                    h, m = hidden, mask
                else:
                    index = live.to(device)
                    h, m = hidden[index].contiguous(), mask[index].contiguous()
                out[name] = self.run_graph(branch_name(name), hidden=h, attention_mask=m)
            for key, live in rows.detours(k):
                started = time.perf_counter()
                index = None if live is None else live.to(device)
                out[key] = self.detour(key, k, hidden if index is None else hidden[index].contiguous(),
                                       mask if index is None else mask[index].contiguous())
                if spent is not None:
                    spent[key] = spent.get(key, 0.0) + time.perf_counter() - started
            if k >= rows.depth:
                return {name: logits.float().cpu() for name, logits in out.items()}
            keep = rows.leave_after(k)
            if keep is not None:
                keep = keep.to(device)
                hidden, mask = hidden[keep].contiguous(), mask[keep].contiguous()
            if k not in self.segments:
                raise CentraError(f"{type(self).__name__}: no trunk segment starts after layer {k}")
            name, k = self.segments[k]
            hidden = self.run_graph(name, hidden=hidden, attention_mask=mask)
