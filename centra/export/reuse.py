"""Incremental merge: a new version reuses every ONNX graph of an earlier version whose inputs did not change.

A graph's key is the sha256 of everything its bytes depend on: the graph (its name and kind, a segment's
layer bounds, a branch's head sha256 and the spec fields the branch reads), the backbone's fingerprint
and encoder config, the graph style and opset, and the exporter (centra's EXPORT_FORMAT and torch's
version); an int8 graph's key adds the quantizer (onnxruntime's and onnx's versions and centra's
quantization settings) to its fp32 key. The manifest records each graph's keys ("keys": {"fp32": ...,
"int8": ...}). A merge looks the keys up in OUT's kept versions (`GraphCache`), links the file when the
key matches and its bytes still hash to what that version's manifest recorded, and exports, checks and
quantizes only the rest. A changed head changes its branch's key; a new attach layer splits a trunk
segment, which gets new bounds and so a new key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from centra.core.task import TaskSpec
from centra.core.versions import read_manifest, versions_of
from centra.errors import CentraError
from centra.io import link_verified

# Bump when centra writes different bytes for the same inputs (fused layer writer, export settings).
EXPORT_FORMAT = 1


def digest(data: object) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def exporter_identity(style: str, opset: int) -> dict:
    import torch

    return {"format": EXPORT_FORMAT, "torch": torch.__version__, "style": style, "opset": opset}


def quantizer_identity() -> dict:
    import onnx
    import onnxruntime

    from centra.export.int8 import PER_CHANNEL, QUANTIZED_OPS

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "per_channel": PER_CHANNEL,
            "ops": sorted(QUANTIZED_OPS), "weights": "QInt8 dynamic"}


def graph_keys(graph: dict, specs: dict[str, TaskSpec], fingerprint: str, encoder: dict, exporter: dict,
               quantizer: dict | None) -> dict[str, str]:
    """The graph's keys: "fp32", and "int8" when `quantizer` is given."""
    what = {key: graph[key] for key in ("name", "kind", "first", "last", "task") if key in graph}
    if graph["kind"] == "branch":
        spec = specs[graph["task"]]
        what["head"] = {"sha256": spec.head_sha256, "task_layers": spec.task_layers, "pooling": spec.pooling,
                        "outputs": spec.num_outputs}
    fp32 = digest({"graph": what, "backbone": fingerprint, "encoder": encoder, "exporter": exporter})
    keys = {"fp32": fp32}
    if quantizer is not None:
        keys["int8"] = digest({"fp32": fp32, "quantizer": quantizer})
    return keys


@dataclass(frozen=True)
class Cached:
    path: Path  # the file in an earlier version
    sha256: str  # what that version's manifest recorded
    entry: dict  # its graph entry (per-graph parity and fusions)


class GraphCache:
    """The graphs of OUT's kept versions by key (newest first), and their int8 checks by task path."""

    def __init__(self, out: Path | None):
        self.graphs: dict[str, Cached] = {}
        self.checks: dict[str, dict] = {}  # path key -> an int8 check's entry for that task
        if out is None:
            return
        for name in reversed(versions_of(out)):
            folder = Path(out) / "versions" / name
            try:
                manifest = read_manifest(folder)
            except CentraError:
                continue  # an unreadable manifest is no source; the merge exports instead
            info = manifest.engine
            if info is None or info.name != "onnx":
                continue
            for graph in info.graphs:
                for precision, key in (graph.get("keys") or {}).items():
                    rel = graph.get(precision)
                    if isinstance(key, str) and isinstance(rel, str) and rel in manifest.files:
                        self.graphs.setdefault(key, Cached(folder / rel, manifest.files[rel], graph))
            for entry in ((info.int8 or {}).get("tasks") or {}).values():
                if isinstance(entry, dict) and isinstance(entry.get("path_key"), str):
                    self.checks.setdefault(entry["path_key"], entry)

    def __len__(self) -> int:
        return len(self.graphs)

    def link(self, key: str, dest: Path) -> Cached | None:
        """The cached graph of `key` linked at dest (hash-verified), or None (nothing at dest)."""
        cached = self.graphs.get(key)
        if cached is None:
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        return cached if link_verified(cached.path, dest, cached.sha256) else None
