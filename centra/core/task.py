"""The task folder: tasks/<name>/task.json + head.safetensors, and the branch module it describes.

task.json says everything needed to rebuild the branch (kind, labels, input, attach layer, number of
task layers, pooling) and which backbone it was trained on (id + sha256 fingerprint). head.safetensors
holds the branch's task layers, pooler and classifier. Loading checks the file's sha256 against
task.json, then every key and shape against the backbone config, and refuses any mismatch with one
line naming the file.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from centra.core import INPUTS, KINDS, POOLINGS
from centra.core.backbone import Backbone, EncoderConfig, EncoderLayer, check_state, load_safetensors
from centra.errors import CentraError
from centra.io import sha256_bytes, sha256_file, write_json
from centra.publish import publish_folder, remove_artifact

SCHEMA_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")  # \Z: no trailing newline
DEFAULT_MAX_LENGTH = 128
TASK_FILE = "task.json"
HEAD_FILE = "head.safetensors"
REPORT_FILE = "report.json"
RECIPE_FILE = "recipe.json"
TASK_KIND = "task"
CANDIDATES_DIR = "candidates"  # trained heads kept for `centra plan` (see core/candidates.py)
# the teacher's logits table over the training rows and its pooler and classifier: what distilling more
# students later takes (`centra plan --extra-attach`, centra.train.shallower)
TEACHER_FILE = "teacher.safetensors"


@dataclass
class TaskSpec:
    """The contents of task.json."""

    name: str
    kind: str
    labels: list[str]
    attach_layer: int
    task_layers: int
    backbone: dict
    input: str = "single"
    max_length: int = 128
    pooling: str = "mean"
    thresholds: list[float] | None = None
    max_labels: int | None = None  # multilabel: answer at most this many labels (the highest-scoring ones)
    head_sha256: str = ""
    trained: bool = False
    metrics: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # what it was trained from (recipe and data sha256)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_outputs(self) -> int:
        return 1 if self.kind == "regression" else len(self.labels)

    @property
    def encoding_key(self) -> tuple[str, int]:
        """Tasks with the same key read the same tokens, so they share one trunk pass."""
        return self.input, self.max_length

    def to_dict(self) -> dict:
        data = asdict(self)
        order = ["schema_version", "name", "kind", "labels", "input", "max_length", "attach_layer",
                 "task_layers", "pooling", "thresholds", "backbone", "head_sha256", "trained", "metrics", "source"]
        if self.max_labels is not None:  # written only when set: task.json files without it stay byte-identical
            order.insert(order.index("thresholds") + 1, "max_labels")
        return {key: data[key] for key in order}

    @classmethod
    def from_dict(cls, data: dict, source: str) -> TaskSpec:
        """Parse task.json: required fields checked by type, optional ones default (never a KeyError)."""
        if data.get("schema_version") != SCHEMA_VERSION:
            raise CentraError(f"{source}: schema_version {data.get('schema_version')!r} is not supported "
                              f"(expected {SCHEMA_VERSION})")
        required = {"name": str, "kind": str, "labels": list, "attach_layer": int, "task_layers": int,
                    "backbone": dict, "head_sha256": str}
        optional = {"input": str, "max_length": int, "pooling": str, "trained": bool, "metrics": dict,
                    "thresholds": (list, type(None)), "max_labels": (int, type(None)), "source": dict}
        for key, typ in {**required, **optional}.items():
            if key not in data:
                if key in required:
                    raise CentraError(f"{source}: missing field {key!r}")
                continue
            value = data[key]
            if not isinstance(value, typ) or (typ in (int, (int, type(None))) and isinstance(value, bool)):
                name = typ.__name__ if isinstance(typ, type) else f"{typ[0].__name__} or null"
                raise CentraError(f"{source}: field {key!r} must be {name}")
        spec = cls(**{k: data[k] for k in (*required, *optional) if k in data})
        if spec.kind == "multilabel" and spec.thresholds is None:
            spec.thresholds = [0.5] * len(spec.labels)
        spec.validate(source)
        return spec

    def validate(self, source: str, cfg: EncoderConfig | None = None) -> None:
        def bad(msg: str) -> CentraError:
            return CentraError(f"{source}: {msg}")

        if not NAME_RE.match(self.name):
            raise bad(f"task name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        if self.kind not in KINDS:
            raise bad(f"kind {self.kind!r} must be one of {', '.join(KINDS)}")
        if self.input not in INPUTS:
            raise bad(f"input {self.input!r} must be one of {', '.join(INPUTS)}")
        if self.pooling not in POOLINGS:
            raise bad(f"pooling {self.pooling!r} must be one of {', '.join(POOLINGS)}")
        if not all(isinstance(x, str) and x for x in self.labels) or len(set(self.labels)) != len(self.labels):
            raise bad("labels must be distinct non-empty strings")
        if self.kind == "regression" and len(self.labels) != 1:
            raise bad("a regression task has exactly one label (the name of its value)")
        if self.kind == "multiclass" and len(self.labels) < 2:
            raise bad("a multiclass task needs at least 2 labels")
        if self.kind == "multilabel" and not self.labels:
            raise bad("a multilabel task needs at least 1 label")
        if self.thresholds is not None:
            if self.kind != "multilabel":
                raise bad("thresholds are for multilabel tasks only")
            ok = isinstance(self.thresholds, list) and len(self.thresholds) == len(self.labels)
            if not ok or not all(isinstance(t, (int, float)) and 0 <= t <= 1 for t in self.thresholds):
                raise bad("thresholds must be one number in [0, 1] per label")
        if self.max_labels is not None and (self.kind != "multilabel" or self.max_labels < 1):
            raise bad("max_labels is for multilabel tasks only, and must be >= 1")
        if self.attach_layer < 0 or self.task_layers < 0:
            raise bad("attach_layer and task_layers must be >= 0")
        if self.max_length < 4:
            raise bad("max_length must be >= 4")
        if not {"id", "fingerprint"} <= set(self.backbone) or \
                not all(isinstance(self.backbone[k], str) for k in ("id", "fingerprint")):
            raise bad("backbone must hold 'id' and 'fingerprint' strings")
        if cfg is not None:
            if self.attach_layer + self.task_layers > cfg.num_layers:
                raise bad(f"attach_layer {self.attach_layer} + task_layers {self.task_layers} exceeds the "
                          f"backbone's {cfg.num_layers} layers")
            if self.max_length > max_positions(cfg):
                raise bad(f"max_length {self.max_length} exceeds the backbone's position embeddings")


def max_positions(cfg: EncoderConfig) -> int:
    """The longest token sequence the backbone's position embeddings allow."""
    offset = cfg.pad_token_id + 1 if cfg.position_style == "roberta" else 0
    return cfg.max_position_embeddings - offset


class TaskHead(nn.Module):
    """A task's branch: its task layers, then pooling, a tanh pooler and the classifier."""

    def __init__(self, spec: TaskSpec, cfg: EncoderConfig):
        super().__init__()
        self.spec = spec
        self.cfg = cfg
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(spec.task_layers))
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.hidden_dropout)
        self.classifier = nn.Linear(cfg.hidden_size, spec.num_outputs)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden: (B, T, H) at the attach layer; returns logits (B, num_outputs)."""
        for layer in self.layers:
            hidden = layer(hidden, bias)
        return self.readout(hidden, mask)

    def readout(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The logits of the task layers' output: pooling, the tanh pooler, the classifier."""
        if self.spec.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.classifier(self.drop(torch.tanh(self.pooler(pooled))))

    def with_spec(self, spec: TaskSpec) -> TaskHead:
        """This branch (the same modules and weights) described by `spec`, as a new head object: a
        trained or published spec is handed back, never assigned to a head a caller holds."""
        head = copy.copy(self)
        head.spec = spec
        return head


def task_dirs(tasks_dir: Path) -> list[Path]:
    """Task folders under tasks_dir, by name; dot-folders are in-progress or discarded writes."""
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise CentraError(f"{tasks_dir}: no such tasks folder")
    return sorted(p for p in tasks_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_task_json(folder: Path, name: str | None = None) -> tuple[TaskSpec, str]:
    """Parse folder/task.json; return the spec and the sha256 of the bytes parsed. `name`: the name
    the task must have (default: its folder's name)."""
    path = Path(folder) / TASK_FILE
    if not path.is_file() and (Path(folder) / RECIPE_FILE).is_file():
        raise CentraError(f"{path}: file not found: the task has a recipe but is not trained yet "
                          f"(centra add-task --tasks-dir {Path(folder).parent} --name {Path(folder).name})")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CentraError(f"{path}: file not found") from None
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CentraError(f"{path}: malformed JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(parsed, dict):
        raise CentraError(f"{path}: expected a JSON object")
    spec = TaskSpec.from_dict(parsed, str(path))
    expected = name or Path(folder).name
    if spec.name != expected:
        raise CentraError(f"{path}: name {spec.name!r} does not match its folder {expected!r}")
    return spec, sha256_bytes(data)


def read_spec(folder: Path) -> TaskSpec:
    return read_task_json(folder)[0]


def load_task(folder: Path, backbone: Backbone | EncoderConfig, check_fingerprint: bool = True,
              manifest_sha256: str | None = None, name: str | None = None) -> tuple[TaskSpec, TaskHead]:
    """Read and fully validate one task folder against a backbone; return its spec and branch.
    `manifest_sha256`: the head's hash recorded by a merged folder's manifest, checked too.
    `name`: the task's name when the folder is not named after it (a staged copy)."""
    folder = Path(folder)
    spec, _ = read_task_json(folder, name)
    cfg = backbone.cfg if isinstance(backbone, Backbone) else backbone
    spec.validate(str(folder / TASK_FILE), cfg)
    if check_fingerprint and isinstance(backbone, Backbone):
        if spec.backbone["fingerprint"] != backbone.fingerprint:
            raise CentraError(f"{folder / TASK_FILE}: trained on backbone {spec.backbone['id']!r} "
                              f"({spec.backbone['fingerprint'][:19]}...), not on {backbone.backbone_id!r} "
                              f"({backbone.fingerprint[:19]}...)")
    head_file = folder / HEAD_FILE
    if not head_file.is_file():
        raise CentraError(f"{head_file}: file not found")
    digest = sha256_file(head_file)
    if manifest_sha256 is not None and digest != manifest_sha256:
        raise CentraError(f"{head_file}: sha256 differs from the manifest (corrupt or replaced file)")
    if digest != spec.head_sha256:
        raise CentraError(f"{head_file}: sha256 differs from task.json's head_sha256 (corrupt or replaced file)")
    head = TaskHead(spec, cfg)
    state = load_safetensors(head_file)
    check_state(head.state_dict(), state, str(head_file))
    head.load_state_dict(state, strict=True)
    return spec, head.eval().requires_grad_(False)


def is_legacy_task(folder: Path) -> bool:
    """A task folder written by a centra that put no marker file in it."""
    names = {p.name for p in Path(folder).iterdir()}
    return TASK_FILE in names and names <= {TASK_FILE, HEAD_FILE, REPORT_FILE, RECIPE_FILE}


def save_task(folder: Path, spec: TaskSpec, head: TaskHead, extra_files: dict[str, dict] | None = None,
              candidates: dict[str, tuple[TaskSpec, TaskHead]] | None = None,
              tensor_files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] | None = None) -> TaskSpec:
    """Publish the task folder: staged, re-loaded, then swapped in as one step; return the spec as
    written (with its head's sha256; `spec` and `head` are left as they were). A crash leaves the
    previous version intact; the folder's recipe.json is carried over unchanged. `candidates`: other
    trained heads to keep beside the active one, each in candidates/ID/ as a task folder of its own
    (`centra plan` activates one of them). `tensor_files`: name -> (tensors, metadata), each written as
    a safetensors file (the teacher's, TEACHER_FILE)."""
    folder = Path(folder)
    for name in candidates or {}:
        if not NAME_RE.match(name):
            raise CentraError(f"candidate id {name!r} must be letters, digits, '_' or '-'")
    from safetensors.torch import save_file

    written: list[TaskSpec] = []

    def build(tmp: Path) -> None:
        written[:] = [write_head(tmp, spec, head)]
        for name, data in (extra_files or {}).items():
            write_json(tmp / name, data)
        for name, (tensors, metadata) in (tensor_files or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name), metadata)
        for name, (cand_spec, cand_head) in (candidates or {}).items():
            (tmp / CANDIDATES_DIR / name).mkdir(parents=True)
            write_head(tmp / CANDIDATES_DIR / name, cand_spec, cand_head)

    def check(tmp: Path) -> None:
        load_task(tmp, head.cfg, check_fingerprint=False, name=folder.name)
        for name in candidates or {}:
            load_task(tmp / CANDIDATES_DIR / name, head.cfg, check_fingerprint=False, name=folder.name)
        for name in tensor_files or {}:
            load_safetensors(tmp / name)

    publish_folder(folder, TASK_KIND, build, check, keep=(RECIPE_FILE,), legacy=is_legacy_task)
    return written[0]


def write_head(folder: Path, spec: TaskSpec, head: TaskHead) -> TaskSpec:
    """head.safetensors and task.json into folder; return the spec written (`spec` with the head's sha256)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(Path(folder) / HEAD_FILE))
    written = replace(spec, head_sha256=sha256_file(Path(folder) / HEAD_FILE))
    write_json(Path(folder) / TASK_FILE, written.to_dict())
    return written


def remove_task(folder: Path) -> None:
    """Remove a task folder in one step; refuse a folder that is not a centra task."""
    if not NAME_RE.match(Path(folder).name):
        raise CentraError(f"{folder}: no such task")
    remove_artifact(Path(folder), TASK_KIND, keep=(RECIPE_FILE,), legacy=is_legacy_task)


def backbone_ref(backbone: Backbone) -> dict:
    from centra.core.backbone import DEFAULT_BACKBONE_ID

    ref = {"id": backbone.backbone_id, "fingerprint": backbone.fingerprint}
    if backbone.backbone_id != DEFAULT_BACKBONE_ID and backbone.path is not None:
        ref["path"] = str(backbone.path)
    return ref


def init_task(backbone: Backbone, name: str, kind: str, labels: list[str], attach_layer: int,
              task_layers: int, input: str = "single", max_length: int | None = None, pooling: str = "mean",
              seed: int = 0) -> tuple[TaskSpec, TaskHead]:
    """An untrained task: the backbone's layers k+1..k+l copied, a fresh classifier (seeded).

    max_length defaults to 128 tokens, or the backbone's limit when that is smaller.
    """
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, max_positions(backbone.cfg))
    if kind == "regression" and not labels:
        labels = ["value"]
    spec = TaskSpec(name=name, kind=kind, labels=list(labels), attach_layer=attach_layer,
                    task_layers=task_layers, backbone=backbone_ref(backbone), input=input,
                    max_length=max_length, pooling=pooling,
                    thresholds=[0.5] * len(labels) if kind == "multilabel" else None)
    spec.validate(f"task {name!r}", backbone.cfg)
    head = TaskHead(spec, backbone.cfg)
    for i, layer in enumerate(backbone.layers[attach_layer:attach_layer + task_layers]):
        head.layers[i] = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(seed)
    std = backbone.cfg.initializer_range
    with torch.no_grad():
        if backbone.pooler is not None:
            head.pooler.load_state_dict(backbone.pooler.state_dict())
        else:
            head.pooler.weight.copy_(torch.randn(head.pooler.weight.shape, generator=gen) * std)
            head.pooler.bias.zero_()
        head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=gen) * std)
        head.classifier.bias.zero_()
    return spec, head.eval().requires_grad_(False)
