"""The manifest of a merged model version (manifest.json) as typed records.

`core/merge.write_merged` builds a `Manifest` and writes `to_dict()`; `read_manifest` parses the file
through `Manifest.from_dict`, which checks every field (one line naming the file), and every reader
uses the record's attributes. The JSON layout is the one manifest.json has always had, key for key and
in the same order, so the same merge writes the same bytes and keeps its content id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from centra.core.overhead import TokenGroup
from centra.core.task import NAME_RE
from centra.errors import CentraError
from centra.io import bad_relative_path, sha256_bytes, shorten

FORMAT = "centra-merged"
MANIFEST_VERSION = 2
# every field of an engine field with its type, in the order the exports write them (ONNX's and TensorRT's
# fields never meet, so one order serves both)
ENGINE_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "precision": str, "opset": int, "exporter": str, "style": str, "tolerance": (int, float),
    "tensorrt": str, "device": str, "compute_capability": str, "calibrated_on": int, "max_batch": int,
    "max_length": int, "graphs": list, "parity": dict, "fusions": dict, "int8": dict, "onnx_parity": dict,
    "onnx_checks": dict, "check": dict}
# the keys each engine's export writes, in its order (export/onnx.py, export/tensorrt.py)
ENGINE_FIELDS = {
    "onnx": ("name", "precision", "opset", "exporter", "style", "tolerance", "graphs", "parity", "fusions", "int8"),
    "tensorrt": ("name", "precision", "tensorrt", "device", "compute_capability", "calibrated_on", "max_batch",
                 "max_length", "graphs", "onnx_parity", "onnx_checks", "check")}
REQUIRED = {"format": str, "schema_version": int, "version": str, "backbone": dict, "encoder": dict,
            "trunk_depth": int, "tasks": list, "files": dict, "overhead_layers": int, "single_task_layers": int,
            "trunk_passes": list}
TASK_TYPES = {"kind": str, "labels": list, "input": str, "max_length": int, "attach_layer": int, "task_layers": int,
              "trained": bool, "head_sha256": str, "source": str}
OPTIONAL_TASK_FIELDS = ("trained", "head_sha256", "source")


def content_id(manifest: dict) -> str:
    """What a version is known by: "sha256:<hex>" of the manifest's canonical JSON (keys sorted, compact,
    UTF-8), less its own "content_id" key. The manifest lists the sha256 of every other file of the
    version, so two versions with the same id hold the same bytes, whatever their names."""
    body = {key: value for key, value in manifest.items() if key != "content_id"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return sha256_bytes(text.encode("utf-8"))


def short_id(content: str) -> str:
    """The first 12 hex digits of a content id, for log lines."""
    return content.removeprefix("sha256:")[:12] or "none"


def malformed(source: str, what: str) -> CentraError:
    return CentraError(f"{source}: malformed manifest ({what})")


def type_name(typ: type | tuple[type, ...]) -> str:
    return "a number" if isinstance(typ, tuple) else typ.__name__


def has_type(value: object, typ: type | tuple[type, ...]) -> bool:
    return isinstance(value, typ) and not (isinstance(value, bool) and typ is not bool)


@dataclass(frozen=True)
class BackboneInfo:
    """The backbone the trunk was cut from: its id, sha256 fingerprint, folder and depth."""

    id: str
    fingerprint: str
    num_layers: int
    path: str | None = None

    def to_dict(self) -> dict:
        path = {} if self.path is None else {"path": self.path}
        return {"id": self.id, "fingerprint": self.fingerprint, **path, "num_layers": self.num_layers}

    @classmethod
    def from_dict(cls, data: dict, source: str) -> BackboneInfo:
        if not {"id", "fingerprint", "num_layers"} <= set(data):
            raise malformed(source, "backbone needs id, fingerprint, num_layers")
        for key, typ in (("id", str), ("fingerprint", str), ("num_layers", int), ("path", str)):
            if (key != "path" or data.get(key) is not None) and not has_type(data.get(key), typ):
                raise malformed(source, f"backbone {key!r} must be {typ.__name__}")
        return cls(data["id"], data["fingerprint"], data["num_layers"], data.get("path"))


@dataclass(frozen=True)
class ManifestTask:
    """One task of the version, as merged: what its task.json says, and the folder it was copied from."""

    name: str
    kind: str
    labels: tuple[str, ...]
    input: str
    max_length: int
    attach_layer: int
    task_layers: int
    trained: bool = False
    head_sha256: str | None = None
    source: str | None = None  # the task folder merged (resolved)

    def to_dict(self) -> dict:
        data = {"name": self.name, "kind": self.kind, "labels": list(self.labels), "input": self.input,
                "max_length": self.max_length, "attach_layer": self.attach_layer, "task_layers": self.task_layers,
                "trained": self.trained, "head_sha256": self.head_sha256, "source": self.source}
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_dict(cls, data: object, source: str) -> ManifestTask:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise malformed(source, "each task needs a name")
        name = data["name"]
        if not NAME_RE.fullmatch(name):  # fullmatch: the rule's "$" would let a trailing newline through
            raise malformed(source, f"task name {shorten(name)!r} must be 1-64 letters, digits, '_' or '-'")
        for key, typ in TASK_TYPES.items():
            if (key in data or key not in OPTIONAL_TASK_FIELDS) and not has_type(data.get(key), typ):
                raise malformed(source, f"task {name!r}: {key!r} must be {type_name(typ)}")
        return cls(name, data["kind"], tuple(data["labels"]), data["input"], data["max_length"],
                   data["attach_layer"], data["task_layers"], data.get("trained", False), data.get("head_sha256"),
                   data.get("source"))


@dataclass(frozen=True)
class EngineInfo:
    """The manifest's "engine" field: the runtime a version's graphs are for ("onnx" | "tensorrt"), its
    precision, the graphs of runtime.graphs.graph_layout (each entry the layout's, plus its files: "fp32"
    and "int8" for ONNX, "onnx" and "plan" for TensorRT, relative to the version folder), and what the
    export checked. Fields an engine does not write are None."""

    name: str
    precision: str | None = None
    graphs: tuple[dict, ...] = ()
    # ONNX Runtime (export/onnx.py)
    opset: int | None = None
    exporter: str | None = None
    style: str | None = None
    tolerance: float | None = None
    parity: dict | None = None
    fusions: dict | None = None
    int8: dict | None = None  # the int8 check's report (int8 only)
    # TensorRT (export/tensorrt.py): the plans run only where they were built
    tensorrt: str | None = None  # the TensorRT version that built them
    device: str | None = None
    compute_capability: str | None = None
    calibrated_on: int | None = None  # texts int8 was calibrated on (None: not int8)
    max_batch: int | None = None
    max_length: int | None = None
    onnx_parity: dict | None = None
    onnx_checks: dict | None = None
    check: dict | None = None

    def files(self, key: str) -> dict[str, str]:
        """Graph name -> its file under `key` ("fp32", "int8", "plan", ...), for the graphs that name one."""
        return {g["name"]: g[key] for g in self.graphs if isinstance(g.get(key), str)}

    def has_files(self, *keys: str) -> bool:
        """Every graph names a file under each of `keys`."""
        return all(isinstance(g.get(key), str) for g in self.graphs for key in keys)

    def to_dict(self) -> dict:
        keys = ENGINE_FIELDS.get(self.name, tuple(ENGINE_TYPES))
        # TensorRT's export writes every field (calibrated_on null when not int8); ONNX's leaves out int8's
        every = self.name == "tensorrt"
        data = {key: getattr(self, key) for key in keys if every or getattr(self, key) is not None}
        if "graphs" in data:
            data["graphs"] = [dict(g) for g in self.graphs]
        return data

    @classmethod
    def from_dict(cls, data: object, source: str) -> EngineInfo:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise malformed(source, "engine must be an object with a name")
        for key, typ in ENGINE_TYPES.items():
            if data.get(key) is not None and not has_type(data[key], typ):
                raise malformed(source, f"engine {key!r} must be {type_name(typ)}")
        if not all(isinstance(g, dict) and isinstance(g.get("name"), str) for g in data.get("graphs") or []):
            raise malformed(source, "each engine graph must be an object with a name")
        values = {key: data.get(key) for key in ENGINE_TYPES if key != "graphs"}
        return cls(**values, graphs=tuple(dict(g) for g in data.get("graphs") or []))


@dataclass(frozen=True)
class Manifest:
    """One merged model version: its backbone and encoder, the trunk (its depth and one pass per token
    group), its tasks, the overhead, the engine files (when not torch only), the sha256 of every other
    file of the version, and the content id it is known by."""

    version: str
    backbone: BackboneInfo
    encoder: dict  # core.backbone.EncoderConfig's fields
    trunk_depth: int
    trunk_passes: tuple[TokenGroup, ...]
    tasks: tuple[ManifestTask, ...]
    overhead_layers: int
    single_task_layers: int
    engine: EngineInfo | None = None
    files: dict[str, str] = field(default_factory=dict)
    content_id: str = ""
    # candidate heads (centra.core.shadow), each named after the task it stands beside; its files are
    # candidates/<task>/. Written only when there are some: a version without keeps its bytes.
    candidates: tuple[ManifestTask, ...] = ()

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> ManifestTask | None:
        return next((t for t in self.tasks if t.name == name), None)

    def candidate(self, name: str) -> ManifestTask | None:
        """Task `name`'s candidate head, or None."""
        return next((t for t in self.candidates if t.name == name), None)

    def with_content_id(self) -> Manifest:
        return replace(self, content_id=content_id(self.to_dict()))

    def to_dict(self) -> dict:
        data = {"format": FORMAT, "schema_version": MANIFEST_VERSION, "version": self.version,
                "backbone": self.backbone.to_dict(), "encoder": dict(self.encoder), "trunk_depth": self.trunk_depth,
                "trunk_passes": [g.to_dict() for g in self.trunk_passes], "tasks": [t.to_dict() for t in self.tasks],
                "overhead_layers": self.overhead_layers, "single_task_layers": self.single_task_layers}
        if self.candidates:
            data["candidates"] = [t.to_dict() for t in self.candidates]
        if self.engine is not None:
            data["engine"] = self.engine.to_dict()
        data["files"] = dict(self.files)
        if self.content_id:
            data["content_id"] = self.content_id
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str) -> Manifest:
        """Every field checked (one line naming `source`): task names by the task-name rule and unique,
        every `files` entry a relative path inside the version, and the content_id (filled in when an
        earlier centra wrote none)."""
        check_header(data, source)
        backbone = BackboneInfo.from_dict(data["backbone"], source)
        tasks = tuple(ManifestTask.from_dict(entry, source) for entry in data["tasks"])
        seen: set[str] = set()
        for task in tasks:
            if task.name.lower() in seen:
                raise malformed(source, f"duplicate task name {task.name!r}")
            seen.add(task.name.lower())
        candidates = data.get("candidates", [])
        if not isinstance(candidates, list):
            raise malformed(source, "'candidates' must be list")
        candidates = tuple(ManifestTask.from_dict(entry, source) for entry in candidates)
        names = [t.name for t in tasks]
        for i, entry in enumerate(candidates):
            if entry.name not in names:
                raise malformed(source, f"candidate head for {entry.name!r}, which is not a task of the version")
            if entry.name in (c.name for c in candidates[:i]):
                raise malformed(source, f"two candidate heads for task {entry.name!r}")
        passes = tuple(TokenGroup.from_dict(p, source) for p in data["trunk_passes"])
        engine = EngineInfo.from_dict(data["engine"], source) if data.get("engine") is not None else None
        check_files(data["files"], source)
        expected = content_id(data)
        stored = data.get("content_id", expected)
        if stored != expected:
            raise CentraError(f"{source}: content_id differs from the manifest's content (edited after publishing)")
        return cls(data["version"], backbone, dict(data["encoder"]), data["trunk_depth"], passes, tasks,
                   data["overhead_layers"], data["single_task_layers"], engine, dict(data["files"]), stored,
                   candidates)


def check_header(data: dict, source: str) -> None:
    """The format, the schema version, and every required field present with its type."""
    if data.get("format") != FORMAT:
        raise CentraError(f"{source}: not a centra merged model manifest")
    if data.get("schema_version") != MANIFEST_VERSION:
        raise CentraError(f"{source}: a merged model in the layout of an earlier centra (schema_version "
                          f"{data.get('schema_version')!r}, expected {MANIFEST_VERSION}): merge the tasks again "
                          "into a new --out folder")
    for key, typ in REQUIRED.items():
        if key not in data:
            raise malformed(source, f"missing {key!r}")
        if not isinstance(data[key], typ):
            raise malformed(source, f"{key!r} must be {typ.__name__}")


def check_files(files: dict, source: str) -> None:
    """Every entry a plain relative path inside the version, with a sha256 string."""
    for rel, digest in files.items():
        why = bad_relative_path(rel)
        if why is not None:
            raise malformed(source, f"files entry {shorten(rel)!r} {why}")
        if not isinstance(digest, str):
            raise malformed(source, f"files entry {shorten(rel)!r} needs a sha256 string")
