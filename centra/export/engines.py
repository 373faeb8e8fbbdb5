"""The runtime a merged version is built for, and `merge`: validate task folders, build the engine's files
(ONNX graphs, TensorRT plans) into the staged version, publish it.

The engine x precision rules live here, checked before any work. A refusal is a FieldError naming the
inputs by field (engine, precision, calibration, max_batch, keep_fp32, int8_fp32); the CLI writes them as
its flags. Light to import: torch, onnx and tensorrt are imported when a merge runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from centra.core import DEFAULT_TASKS_DIR, ENGINES, PRECISIONS, check_int8_fp32
from centra.core.versions import DEFAULT_KEEP_VERSIONS
from centra.errors import FieldError, Name

if TYPE_CHECKING:
    from centra.core.manifest import EngineInfo, Manifest

DEFAULT_PRECISION = {"onnx": "fp32", "tensorrt": "fp16"}
Sequences = tuple[list[str], list[tuple[str, str]]]  # texts, and text pairs (core.texts.read_sequences_file)


def check_engine_options(engine: str, precision: str | None = None, calibration: object = None,
                         max_batch: int | None = None, keep_fp32: bool = False,
                         int8_fp32: Sequence[str] = ()) -> None:
    """The engine x precision rules: a precision the engine has; calibration texts and max_batch for
    TensorRT only; calibration texts exactly when TensorRT builds int8 plans; keep_fp32 and int8_fp32
    (known node groups) for ONNX int8."""
    if engine not in ENGINES:
        raise FieldError(Name("engine"), f" {engine!r} is unknown (known: {', '.join(ENGINES)})")
    if precision is not None and precision not in PRECISIONS.get(engine, ()):
        known = [part for e, p in PRECISIONS.items() for part in ("; ", Name("engine"), f" {e}: {', '.join(p)}")]
        raise FieldError(Name("precision"), f" {precision} does not apply to ", Name("engine"), f" {engine} (",
                         *known[1:], ")")
    if max_batch is not None and max_batch < 1:
        raise FieldError(Name("max_batch"), f" must be >= 1, not {max_batch}")
    if (calibration or max_batch) and engine != "tensorrt":
        raise FieldError(Name("calibration"), " and ", Name("max_batch"), " apply to ", Name("engine"), " tensorrt")
    if keep_fp32 and (engine, precision) != ("onnx", "int8"):
        raise FieldError(Name("keep_fp32"), " applies to ", Name("engine"), " onnx ", Name("precision"), " int8")
    if check_int8_fp32(int8_fp32) and (engine, precision) != ("onnx", "int8"):
        raise FieldError(Name("int8_fp32"), " applies to ", Name("engine"), " onnx ", Name("precision"), " int8")
    if engine == "tensorrt" and (precision == "int8") != bool(calibration):
        raise FieldError(Name("engine"), " tensorrt ", Name("precision"), " int8 needs ", Name("calibration"),
                         " FILE (a few hundred dev texts, one per line), and ", Name("calibration"),
                         " applies to int8 only")


def extender(engine: str, precision: str | None = None, calibration: Path | str | Sequences | None = None,
             max_batch: int | None = None, progress: bool = True, out: Path | None = None,
             keep_fp32: bool = False, int8_fp32: Sequence[str] = ()) -> Callable[[Path, Manifest], EngineInfo] | None:
    """write_merged's `extend` for the engine (None for torch: its files are in every version). TensorRT
    int8 calibrates on `calibration`: a texts file (text<TAB>second text for pair tasks) or its texts.
    ONNX reuses the graphs of OUT's kept versions whose inputs did not change (centra.export.reuse); its
    int8 graphs keep the node groups `int8_fp32` in fp32."""
    check_engine_options(engine, precision, calibration, max_batch, keep_fp32, int8_fp32)
    if engine == "onnx":
        from centra.export.onnx import onnx_extender

        return onnx_extender(precision or DEFAULT_PRECISION[engine], progress=progress, out=out,
                             keep_fp32=keep_fp32, int8_fp32=check_int8_fp32(int8_fp32))
    if engine == "tensorrt":
        from centra.core.texts import read_sequences_file
        from centra.export.tensorrt import DEFAULT_MAX_BATCH, tensorrt_extender

        texts = read_sequences_file(Path(calibration)) if isinstance(calibration, (str, Path)) else calibration
        return tensorrt_extender(precision or DEFAULT_PRECISION[engine], texts, max_batch or DEFAULT_MAX_BATCH,
                                 progress)
    return None


def merge(tasks_dirs: Sequence[Path | str] | Path | str | None, out: Path | str, *, engine: str = "torch",
          precision: str | None = None, calibration: Path | str | Sequences | None = None,
          max_batch: int | None = None, backbone: str | None = None,
          keep_versions: int = DEFAULT_KEEP_VERSIONS, keep_fp32: bool = False, int8_fp32: Sequence[str] = (),
          candidates: Mapping[str, Path | str] | None = None, progress: bool = True) -> Manifest:
    """Validate every task folder of `tasks_dirs` (default: tasks/), build the files `engine` runs (ONNX
    graphs checked against torch, reusing the unchanged graphs of OUT's kept versions; TensorRT plans on
    this GPU) and publish them as a new version of `out`; its manifest. An ONNX int8 version holds the
    int8 graphs and the torch files, and its fp32 graphs too with `keep_fp32`; `int8_fp32` names node
    groups its int8 graphs keep in fp32 (centra.core.INT8_FP32: "ffn-out", the FFN output projections,
    which recovers most of int8's accuracy loss at a cost in speed). `candidates`: task name -> a trained
    folder of the same task, published as that task's candidate head (centra.core.shadow: shadowed or
    canaried when served; its branch exported and checked like the others). Every check comes before any
    work: OUT is never written over a user's file or folder."""
    from centra.core.merge import MODEL_KIND, plan_merge, write_merged
    from centra.core.versions import earlier_heads
    from centra.publish import check_replaceable, check_writable_parent

    out = Path(out)
    check_writable_parent(out)
    check_replaceable(out, MODEL_KIND)
    extend = extender(engine, precision, calibration, max_batch, progress, out, keep_fp32, int8_fp32)
    if isinstance(tasks_dirs, (str, Path)):
        tasks_dirs = [tasks_dirs]
    plan = plan_merge([Path(d) for d in tasks_dirs or [DEFAULT_TASKS_DIR]], backbone, trusted=earlier_heads(out),
                      candidates={name: Path(folder) for name, folder in (candidates or {}).items()})
    return write_merged(plan, out, keep_versions=keep_versions, extend=extend)


def promote(out: Path | str, task: str, *, keep_versions: int = DEFAULT_KEEP_VERSIONS,
            progress: bool = True) -> Manifest:
    """Publish a new version of `out` in which task's candidate head is its active one (centra.core.shadow);
    every other file byte-identical, the engine files built as the current version's were."""
    return republish(out, task, True, keep_versions=keep_versions, progress=progress)


def drop_candidate(out: Path | str, task: str, *, keep_versions: int = DEFAULT_KEEP_VERSIONS,
                   progress: bool = True) -> Manifest:
    """Publish a new version of `out` without task's candidate head; every other file byte-identical."""
    return republish(out, task, False, keep_versions=keep_versions, progress=progress)


def republish(out: Path | str, task: str, promote: bool, *, keep_versions: int = DEFAULT_KEEP_VERSIONS,
              progress: bool = True) -> Manifest:
    """The current version of `out` published again with task's candidate promoted or dropped
    (centra.core.merge.replan), with the current version's engine and its settings (ONNX precision, fp32
    graphs kept, int8 node groups; TensorRT fp16/fp32 plans: int8 plans need calibration texts, so merge)."""
    from centra.core.merge import MODEL_KIND, replan, write_merged
    from centra.core.versions import earlier_heads, read_version
    from centra.errors import CentraError
    from centra.publish import check_replaceable

    out = Path(out)
    check_replaceable(out, MODEL_KIND)
    version = read_version(out)
    info = version.manifest.engine
    extend = None
    if info is not None and info.name == "onnx":
        int8 = info.int8 or {}
        extend = extender("onnx", info.precision, progress=progress, out=out,
                          keep_fp32=info.precision == "int8" and info.has_files("fp32"),
                          int8_fp32=tuple(int8.get("int8_fp32") or ()))
    elif info is not None and info.name == "tensorrt":
        if info.precision == "int8":
            raise CentraError(f"{version.folder / 'manifest.json'}: TensorRT int8 plans need calibration texts: "
                              "merge the task folders again (centra merge --calibration FILE)")
        extend = extender("tensorrt", info.precision, max_batch=info.max_batch, progress=progress, out=out)
    plan = replan(version, task, promote, trusted=earlier_heads(out))
    return write_merged(plan, out, keep_versions=keep_versions, extend=extend)
