"""`centra bench-scale`: what a task costs as tasks grow — memory, speed, merge time and disk per task count.

Synthetic untrained tasks (attach layer 2..depth-1 at random, 1-2 task layers within the backbone, 3
labels; seeded) are written to a work folder. Per task count and engine (torch; ONNX int8), in processes
of their own (centra.measure.scale_probe) so each figure is that process's: a merge from scratch and one
of +1 task onto it (seconds, peak RSS), the served engine (load and warm-up seconds, texts/s for every
task and for one, RSS after answering), the version's size on disk and what the +1 version added. Up to
`separate_up_to` tasks, the same tasks as separate full-depth models (one model per task, weights
copied). With `reload`, `reload_at_scale` serves the largest count's int8 version and merges +1 task into
it while it serves (centra.measure.bench_reload). `run_bench_scale` does all of it in a work folder (a
temporary one unless given).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from centra.errors import CentraError, FieldError, Name

ENGINES = {"torch": ("torch", None), "onnx-int8": ("onnx", "int8")}
DEFAULT_TASKS = (8, 32, 100)
LABELS = ["a", "b", "c"]
PROBE = "centra.measure.scale_probe"


@dataclass(frozen=True)
class ScaleBenchOptions:
    tasks: tuple[int, ...] = DEFAULT_TASKS
    engines: tuple[str, ...] = tuple(ENGINES)
    separate_up_to: int = 32
    texts: int = 128
    reload: bool = True
    seed: int = 0
    backbone: str | None = None

    def check(self) -> None:
        if not self.tasks or any(n < 1 for n in self.tasks):
            raise FieldError(Name("tasks"), f" must be positive task counts, not {list(self.tasks)}")
        unknown = [e for e in self.engines if e not in ENGINES]
        if unknown or not self.engines:
            raise FieldError(Name("engines"), f" {unknown or list(self.engines)}: known {', '.join(ENGINES)}")
        if self.texts < 1:
            raise FieldError(Name("texts"), f" must be >= 1, not {self.texts}")
        if self.separate_up_to < 0:
            raise FieldError(Name("separate_up_to"), f" must be >= 0, not {self.separate_up_to}")


@dataclass
class ScaleRow:
    tasks: int
    engine: str
    layout: str  # merged | separate
    load_s: float = 0.0
    texts_per_s: float = 0.0
    one_task_texts_per_s: float = 0.0
    rss_mb: float = 0.0
    merge_s: float | None = None
    merge_peak_mb: float | None = None
    add_one_s: float | None = None
    add_one_peak_mb: float | None = None
    version_mb: float | None = None
    add_one_disk_mb: float | None = None
    layers_per_request: int | None = None


@dataclass
class ScaleReport:
    rows: list[ScaleRow] = field(default_factory=list)
    reload: dict | None = None
    texts: str = ""

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "reload": self.reload, "texts": self.texts}


def synthetic_tasks(backbone, folder: Path, count: int, seed: int, start: int = 0) -> list[str]:
    """`count` untrained tasks t{start}..: attach layer 2..depth-1, 1-2 task layers (within the backbone)."""
    from centra.core.task import init_task, save_task

    depth = backbone.cfg.num_layers
    rng = random.Random(f"{seed}-{start}")
    names = []
    for i in range(start, start + count):
        attach = rng.randint(min(2, depth - 1), max(depth - 1, 1))
        layers = rng.randint(1, max(1, min(2, depth - attach)))
        name = f"t{i:04d}"
        spec, head = init_task(backbone, name, "multiclass", LABELS, attach, layers, seed=seed * 100_003 + i)
        save_task(folder / name, spec, head)
        names.append(name)
    return names


# What `centra serve` sets first thing (centra.serve.memory.fix_mmap_threshold), given to the processes
# that measure a served engine through glibc's environment: large blocks in mappings of their own, so
# freed activations go back to the system instead of staying in the heaps of ONNX Runtime's threads
# (100 int8 tasks after 128 texts: 718 MB with it, 1,042 MB without).
SERVED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def run_measured(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """A child process (python `args`): its wall seconds, its own peak RSS in MB (wait4's) and its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        raise CentraError(f"bench-scale: {' '.join(args[:4])} failed: {last}")
    return seconds, usage.ru_maxrss / 1024, stdout


def merge_args(tasks: Path, out: Path, engine: str) -> list[str]:
    name, precision = ENGINES[engine]
    args = ["-m", "centra.cli", "merge", "--tasks-dir", str(tasks), "--out", str(out), "--engine", name]
    return args + (["--precision", precision] if precision else [])


def folder_mb(folder: Path, exclude_inodes: set[int] | None = None) -> float:
    """Bytes of the files under folder (each inode once; those in exclude_inodes left out), in MB."""
    seen, total = set(exclude_inodes or ()), 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total / 2**20


def inodes(folder: Path) -> set[int]:
    return {p.stat().st_ino for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


def probe(model: Path, engine: str, layout: str, texts_file: Path, graphs: Path | None = None) -> dict:
    args = ["-m", PROBE, str(model), ENGINES[engine][0], layout, str(texts_file)] + ([str(graphs)] if graphs else [])
    _, _, out = run_measured(args, SERVED_MALLOC)
    return json.loads(out.strip().splitlines()[-1])


def separate_graphs(model: Path, dest: Path) -> Path:
    """The int8 graphs of every task of `model` as a full-depth model of its own (one export: the
    embeddings, all layers, each task's pooler and classifier), with their engine field in engine.json."""
    from torch import nn

    from centra.core.backbone import load_tokenizer
    from centra.core.graph import MergedModel
    from centra.core.merge import load_merged
    from centra.core.versions import model_folder
    from centra.export.onnx import export_onnx
    from centra.io import write_json
    from centra.measure.bench_engines import full_depth_head
    from centra.measure.scale_probe import ENGINE_FILE

    folder = model_folder(model)
    _, merged = load_merged(folder)
    full = {name: full_depth_head(head, len(merged.trunk)) for name, head in merged.heads.items()}
    info = export_onnx(MergedModel(merged.cfg, merged.embeddings, nn.ModuleList(merged.trunk), full).eval(), dest,
                       "int8", load_tokenizer(folder / "tokenizer"), progress=False, keep_fp32=False)
    write_json(dest / ENGINE_FILE, info.to_dict())
    return dest


def reload_setup(options: ScaleBenchOptions, work: Path) -> tuple[Path, Path, int] | None:
    """For the reload measurement (centra.measure.bench_reload): a copy of the largest count's tasks and
    their int8 version, merged; (tasks folder, OUT, count), or None when int8 is not measured."""
    if not options.reload or "onnx-int8" not in options.engines:
        return None
    count = max(options.tasks)
    out, tasks = work / f"reload-{count}", work / f"reload-tasks-{count}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(tasks, ignore_errors=True)
    shutil.copytree(work / f"tasks-{count}", tasks)
    run_measured(merge_args(tasks, out, "onnx-int8"))
    return tasks, out, count


def bench_scale(options: ScaleBenchOptions, texts: list[str], work: Path, progress: Callable[[str], None],
                source: str = "") -> ScaleReport:
    """Every measurement of the module docstring, in `work` (left as it is: tasks, versions, graphs)."""
    from centra.core.backbone import Backbone
    from centra.core.versions import read_manifest, versions_of

    options.check()
    backbone = Backbone.load(options.backbone)
    texts_file = work / "texts.txt"
    work.mkdir(parents=True, exist_ok=True)
    texts_file.write_text("\n".join(" ".join(t.split()) for t in texts[: options.texts]) + "\n", encoding="utf-8")
    report = ScaleReport(texts=source)
    counts = sorted(set(options.tasks))
    for count in counts:
        tasks = work / f"tasks-{count}"
        if tasks.exists():
            shutil.rmtree(tasks)
        synthetic_tasks(backbone, tasks, count, options.seed)
        for engine in options.engines:
            out = work / f"{engine}-{count}"
            if out.exists():
                shutil.rmtree(out)
            progress(f"{count} tasks, {engine}: merging from scratch")
            merge_s, merge_peak, _ = run_measured(merge_args(tasks, out, engine))
            version = out / "versions" / versions_of(out)[-1]
            size = folder_mb(version)
            layers = read_manifest(version).overhead_layers
            progress(f"{count} tasks, {engine}: serving (load, every task, one task)")
            got = probe(out, engine, "merged", texts_file)
            row = ScaleRow(count, engine, "merged", got["load_s"], got["texts_per_s"], got["one_task_texts_per_s"],
                      got["rss_mb"], round(merge_s, 1), round(merge_peak), version_mb=round(size, 2),
                      layers_per_request=layers)
            extra = work / f"extra-{count}"
            shutil.rmtree(extra, ignore_errors=True)
            shutil.copytree(tasks, extra)
            synthetic_tasks(backbone, extra, 1, options.seed, start=count)
            progress(f"{count} tasks, {engine}: merging +1 task")
            old = inodes(version)
            add_s, add_peak, _ = run_measured(merge_args(extra, out, engine))
            added = out / "versions" / versions_of(out)[-1]
            row.add_one_s, row.add_one_peak_mb = round(add_s, 1), round(add_peak)
            row.add_one_disk_mb = round(folder_mb(added, old), 2)
            report.rows.append(row)
            if count <= options.separate_up_to:
                graphs = None
                if engine != "torch":
                    progress(f"{count} tasks, {engine}: exporting {count} separate full-depth models")
                    graphs = separate_graphs(version, work / f"separate-{engine}-{count}")
                progress(f"{count} tasks, {engine}: {count} separate models")
                got = probe(version, engine, "separate", texts_file, graphs)
                report.rows.append(ScaleRow(count, engine, "separate", got["load_s"], got["texts_per_s"],
                                       got["one_task_texts_per_s"], got["rss_mb"],
                                       layers_per_request=count * backbone.cfg.num_layers))
    return report


def reload_at_scale(options: ScaleBenchOptions, work: Path, progress: Callable[[str], None]) -> dict | None:
    """The reload measurement (centra.measure.bench_reload) at the largest count, int8; None when skipped."""
    from centra.core.backbone import Backbone
    from centra.measure.bench_reload import measure_reload

    setup = reload_setup(options, work)
    if setup is None:
        return None
    tasks, out, count = setup
    backbone = Backbone.load(options.backbone)
    return {"tasks": count, **measure_reload(
        out, lambda: synthetic_tasks(backbone, tasks, 1, options.seed, start=count + 1)[0],
        merge_args(tasks, out, "onnx-int8"), progress)}


def check_workdir(workdir: Path | None) -> None:
    """A work folder to keep must be empty, new, or one bench-scale wrote before (it has texts.txt)."""
    if workdir is not None and workdir.exists() and any(workdir.iterdir()) and not (workdir / "texts.txt").is_file():
        raise CentraError(f"bench-scale: --workdir {workdir}: not empty and not a bench-scale folder")


def run_bench_scale(options: ScaleBenchOptions, texts: list[str], workdir: Path | None,
                    progress: Callable[[str], None], source: str = "") -> ScaleReport:
    """`bench_scale`, then `reload_at_scale`, in `workdir` (kept) or a temporary folder (removed)."""
    check_workdir(workdir)
    with tempfile.TemporaryDirectory(prefix="centra-bench-scale-") as tmp:
        work = workdir or Path(tmp)
        progress(f"synthetic tasks in {work}; {min(len(texts), options.texts)} texts from {source}")
        report = bench_scale(options, texts, work, progress, source)
        report.reload = reload_at_scale(options, work, progress)
    return report
