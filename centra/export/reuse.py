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
from centra.core.versions import VERSIONS, read_manifest, versions_of
from centra.errors import CentraError
from centra.io import link_verified
from centra.runtime.onnx import ONNX_DIR

# Bump when centra writes different bytes for the same inputs (fused layer writer, export settings).
EXPORT_FORMAT = 1


def digest(data: object) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def exporter_identity(style: str, opset: int) -> dict:
    import torch

    return {"format": EXPORT_FORMAT, "torch": torch.__version__, "style": style, "opset": opset}


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
            folder = Path(out) / VERSIONS / name
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


def reuse_graphs(layout: list[dict], keys: dict[str, dict[str, str]], needed: tuple[str, ...], folder: Path,
                 cache: GraphCache | None) -> tuple[dict[str, dict], set[str]]:
    """Per graph of the layout, its manifest entry (with its keys); the graphs whose `needed` files were
    all linked from `cache` carry their earlier entry's files, parity and fusions. Also the names of the
    graphs to export (the rest)."""
    entries, fresh = {}, set()
    for graph in layout:
        name = graph["name"]
        entry = {**graph, "keys": {p: keys[name][p] for p in needed}}
        linked = []
        for p in needed:
            rel = f"{ONNX_DIR}/{p}/{name}.onnx"
            hit = cache.link(keys[name][p], folder / rel) if cache is not None else None
            if hit is None:
                break
            linked.append(rel)
            entry[p] = rel
            entry.setdefault("parity", hit.entry.get("parity"))
            entry.setdefault("fusions", {})
            entry["fusions"][p] = (hit.entry.get("fusions") or {}).get(p) or {}
        if len(linked) < len(needed):  # all or nothing: a graph is exported whole
            for rel in linked:
                (folder / rel).unlink()
            entry = {**graph, "keys": entry["keys"]}
            fresh.add(name)
        else:
            entry["reused"] = True
        entries[name] = entry
    return entries, fresh


def graph_path(layout: list[dict], spec: TaskSpec) -> list[str]:
    """The graphs a task's rows run through: the embeddings, the trunk segments to its attach layer, its branch."""
    return [g["name"] for g in layout if g["kind"] == "embeddings" or g["kind"] == "segment"
            and g["last"] <= spec.attach_layer or g.get("task") == spec.name]


def tasks_through(layout: list[dict], specs: dict[str, TaskSpec], names: set[str]) -> list[str]:
    """The tasks whose rows run through any of the graphs `names`."""
    return [t for t, spec in specs.items() if names.intersection(graph_path(layout, spec))]


def sub_layout(layout: list[dict], tasks: list[str]) -> list[dict]:
    """The layout's embeddings and trunk segments, and the branches of `tasks` only."""
    return [g for g in layout if g["kind"] != "branch" or g["task"] in tasks]
