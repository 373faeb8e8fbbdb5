"""Merge: many task folders on one backbone -> one graph that runs the shared trunk once.

The merged folder (OUT) is self-contained: manifest.json, trunk.safetensors (embeddings + the
backbone's layers up to the deepest attach layer), tokenizer/ and a byte copy of every task folder.
It is built in a temp folder and swapped in, so a refused or crashed merge leaves OUT as it was.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from centra.backbone import (
    Backbone,
    Embeddings,
    EncoderConfig,
    EncoderLayer,
    attention_bias,
    check_state,
    load_safetensors,
    read_json,
)
from centra.errors import CentraError
from centra.fsutil import sha256_file, staged_dir, write_json
from centra.task import HEAD_FILE, TASK_FILE, TaskHead, TaskSpec, load_task, read_spec, task_dirs

MANIFEST = "manifest.json"
TRUNK_FILE = "trunk.safetensors"
FORMAT = "centra-merged"
MANIFEST_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".onnx", ".ot", ".pt", ".md")


class MergedModel(nn.Module):
    """Embeddings + trunk layers computed once; each task's branch reads its attach layer."""

    def __init__(self, cfg: EncoderConfig, embeddings: Embeddings, trunk: nn.ModuleList,
                 heads: dict[str, TaskHead]):
        super().__init__()
        self.cfg = cfg
        self.embeddings = embeddings
        self.trunk = trunk
        self.heads = nn.ModuleDict(heads)
        self.specs: dict[str, TaskSpec] = {name: head.spec for name, head in heads.items()}
        deepest = max((s.attach_layer for s in self.specs.values()), default=0)
        if deepest > len(trunk):
            raise CentraError(f"a task attaches at layer {deepest} but the trunk has {len(trunk)} layers")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                names: list[str]) -> list[torch.Tensor]:
        """Logits of the named tasks (which must share one tokenisation), in the order given.

        The trunk stops at the deepest attach layer among `names`; each branch runs as soon as
        its attach layer is reached, so no hidden state is kept longer than needed.
        """
        unknown = [n for n in names if n not in self.specs]
        if unknown:
            raise CentraError(f"unknown task {unknown[0]!r} (known: {', '.join(sorted(self.specs))})")
        by_layer: dict[int, list[str]] = {}
        for name in names:
            by_layer.setdefault(self.specs[name].attach_layer, []).append(name)
        depth = max(by_layer, default=0)
        bias = attention_bias(attention_mask)
        hidden = self.embeddings(input_ids, token_type_ids)
        out: dict[str, torch.Tensor] = {}
        for k in range(depth + 1):
            if k:
                hidden = self.trunk[k - 1](hidden, bias)
            for name in by_layer.get(k, ()):
                out[name] = self.heads[name](hidden, bias, attention_mask)
        return [out[n] for n in names]

    def depth_for(self, names: list[str]) -> int:
        return max((self.specs[n].attach_layer for n in names), default=0)


class StandaloneModel(nn.Module):
    """One task on its own: embeddings, backbone layers 1..k, then its branch. The merge's reference."""

    def __init__(self, embeddings: Embeddings, layers: list[EncoderLayer], head: TaskHead):
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers[: head.spec.attach_layer])
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        bias = attention_bias(attention_mask)
        hidden = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            hidden = layer(hidden, bias)
        return self.head(hidden, bias, attention_mask)


def merge_in_memory(backbone: Backbone, heads: dict[str, TaskHead]) -> MergedModel:
    """A MergedModel sharing the backbone's modules (no copy): for tests and training tools."""
    depth = max((h.spec.attach_layer for h in heads.values()), default=0)
    return MergedModel(backbone.cfg, backbone.embeddings, nn.ModuleList(backbone.layers[:depth]), heads)


@dataclass
class MergePlan:
    backbone: Backbone
    tasks: list[tuple[Path, TaskSpec]]

    @property
    def trunk_depth(self) -> int:
        return max(spec.attach_layer for _, spec in self.tasks)

    @property
    def overhead_layers(self) -> int:
        return self.trunk_depth + sum(spec.task_layers for _, spec in self.tasks)

    @property
    def single_task_layers(self) -> int:
        return self.backbone.cfg.num_layers * len(self.tasks)


def plan_merge(tasks_dirs: list[Path], backbone: str | None = None) -> MergePlan:
    """Find and validate every task folder; refuse (CentraError naming the file) on any problem."""
    folders = [folder for d in tasks_dirs for folder in task_dirs(Path(d))]
    if not folders:
        raise CentraError(f"{', '.join(str(d) for d in tasks_dirs)}: no task folders to merge")
    specs = [(folder, read_spec(folder)) for folder in folders]
    seen: dict[str, Path] = {}
    for folder, spec in specs:
        key = spec.name.lower()
        if key in seen:
            raise CentraError(f"{folder / TASK_FILE}: duplicate task name {spec.name!r} "
                              f"(also {seen[key] / TASK_FILE})")
        seen[key] = folder
    bb = Backbone.load(backbone if backbone is not None else _backbone_hint(specs[0][1]))
    for folder, _ in specs:
        load_task(folder, bb)  # full validation: fingerprint, sha256, keys, shapes, finite values
    return MergePlan(bb, specs)


def _backbone_hint(spec: TaskSpec) -> str:
    path = spec.backbone.get("path")
    return path if path and Path(path).is_dir() else spec.backbone["id"]


def write_merged(plan: MergePlan, out: Path) -> dict:
    """Write OUT atomically from a validated plan; return the manifest."""
    from safetensors.torch import save_file

    bb, depth = plan.backbone, plan.trunk_depth
    with staged_dir(Path(out)) as tmp:
        trunk = {f"embeddings.{k}": v for k, v in bb.embeddings.state_dict().items()}
        for i in range(depth):
            trunk.update({f"layers.{i}.{k}": v for k, v in bb.layers[i].state_dict().items()})
        save_file({k: v.contiguous() for k, v in trunk.items()}, str(tmp / TRUNK_FILE))
        _copy_tokenizer(bb.path, tmp / "tokenizer")
        entries = []
        for folder, spec in plan.tasks:
            dest = tmp / "tasks" / spec.name
            dest.mkdir(parents=True)
            for name in (TASK_FILE, HEAD_FILE):
                shutil.copyfile(folder / name, dest / name)
            entries.append({"name": spec.name, "kind": spec.kind, "labels": spec.labels, "input": spec.input,
                            "max_length": spec.max_length, "attach_layer": spec.attach_layer,
                            "task_layers": spec.task_layers, "trained": spec.trained,
                            "head_sha256": spec.head_sha256, "source": str(folder.resolve())})
        manifest = {
            "format": FORMAT,
            "schema_version": MANIFEST_VERSION,
            "backbone": {"id": bb.backbone_id, "fingerprint": bb.fingerprint, "path": str(bb.path),
                         "num_layers": bb.cfg.num_layers},
            "encoder": bb.cfg.to_dict(),
            "trunk_depth": depth,
            "trunk_sha256": sha256_file(tmp / TRUNK_FILE),
            "tasks": entries,
            "overhead_layers": plan.overhead_layers,
            "single_task_layers": plan.single_task_layers,
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def _copy_tokenizer(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    for item in sorted(Path(src).iterdir()):
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and not item.name.startswith("."):
            shutil.copyfile(item, dest / item.name)


def read_manifest(out: Path) -> dict:
    path = Path(out) / MANIFEST
    if not Path(out).is_dir():
        raise CentraError(f"{out}: no such merged model folder (build one with `centra merge`)")
    manifest = read_json(path)
    if manifest.get("format") != FORMAT or manifest.get("schema_version") != MANIFEST_VERSION:
        raise CentraError(f"{path}: not a centra merged model manifest (version {MANIFEST_VERSION})")
    return manifest


def load_merged(out: Path) -> tuple[dict, MergedModel]:
    """Load OUT, checking the trunk's and every head's sha256 against the manifest."""
    out = Path(out)
    manifest = read_manifest(out)
    try:
        cfg = EncoderConfig(**manifest["encoder"])
        depth = int(manifest["trunk_depth"])
        entries = list(manifest["tasks"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CentraError(f"{out / MANIFEST}: malformed manifest ({exc})") from None
    trunk_file = out / TRUNK_FILE
    if sha256_file(trunk_file) != manifest.get("trunk_sha256"):
        raise CentraError(f"{trunk_file}: sha256 differs from the manifest (corrupt or replaced file)")
    embeddings, layers = Embeddings(cfg), nn.ModuleList(EncoderLayer(cfg) for _ in range(depth))
    holder = nn.Module()
    holder.embeddings, holder.layers = embeddings, layers
    state = load_safetensors(trunk_file)
    check_state(holder.state_dict(), state, str(trunk_file))
    holder.load_state_dict(state)
    heads = {}
    for entry in entries:
        folder = out / "tasks" / entry["name"]
        spec, heads[entry["name"]] = load_task(folder, cfg, manifest_sha256=entry.get("head_sha256", ""))
        if spec.backbone["fingerprint"] != manifest["backbone"]["fingerprint"]:
            raise CentraError(f"{folder / TASK_FILE}: trained on another backbone than the manifest's")
    model = MergedModel(cfg, embeddings, layers, heads).eval().requires_grad_(False)
    return manifest, model


def overhead_table(manifest: dict) -> str:
    """The task table and the overhead against serving each task as its own model."""
    rows = [("task", "kind", "input", "labels", "attach", "layers", "trained")]
    for t in manifest["tasks"]:
        rows.append((t["name"], t["kind"], t["input"], str(len(t["labels"])), str(t["attach_layer"]),
                     str(t["task_layers"]), "yes" if t.get("trained") else "NO (untrained)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    merged, single = manifest["overhead_layers"], manifest["single_task_layers"]
    lines.append(f"overhead: {merged} layers per request (trunk {manifest['trunk_depth']} + task layers "
                 f"{merged - manifest['trunk_depth']}) vs {single} as {len(manifest['tasks'])} separate "
                 f"{manifest['backbone']['num_layers']}-layer models: {100.0 * merged / single:.0f}%")
    return "\n".join(lines)
