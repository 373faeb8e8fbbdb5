"""The training-cost table: what adding each task cost against fine-tuning the whole model, from the
tasks' report.json files (any trained task folders: `centra costs tasks/ runs/glue/tasks`).

Per task: the full fine-tuning reference's seconds (trained with `--reference`; else "-"), the teacher
search (its cache climbs included) with the teacher's logits table, the students at the teacher's layer,
the shallower students (plan candidates), the whole job without the reference ("all": data, caches,
search, students, thresholds), all / reference, and the served student's dev metric against the
reference's. The precision each ran in is a column: figures of bf16 and fp32 runs are not comparable.
"""

from __future__ import annotations

from pathlib import Path

from centra.core.task import REPORT_FILE, task_dirs
from centra.errors import CentraError
from centra.io import read_json
from centra.train.report import TrainingReport

HEADER = ("| task | precision | train ex. | reference (s) | search (s) | students (s) | shallower (s) | all (s) | "
          "all / reference | served dev metric | reference's | served / reference |")


def read_reports(folders: list[Path]) -> dict[str, TrainingReport]:
    """Every trained task's report under `folders` (task folders, or folders of them), by task name."""
    found: dict[str, TrainingReport] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise CentraError(f"{folder}: not a folder of tasks")
        for task in [folder] if (folder / REPORT_FILE).is_file() else task_dirs(folder):
            if (task / REPORT_FILE).is_file():
                found[task.name] = TrainingReport.from_dict(read_json(task / REPORT_FILE))
    if not found:
        raise CentraError(f"no trained task (no {REPORT_FILE}) under {', '.join(str(f) for f in folders)}")
    return found


def cost_row(name: str, r: TrainingReport) -> str:
    s = r.seconds
    ref = s.get("reference")
    search = s.get("teacher_search", 0.0) + s.get("teacher_logits", 0.0)
    task = s.get("task")  # reports from before it was recorded: the stages' sum
    if task is None:
        task = sum(v for k, v in s.items() if k != "reference" and not k.startswith("teacher_L"))
    served = r.chosen.served if r.chosen else None
    theirs = r.reference.served(r.metric) if r.reference else None

    def sec(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}"

    ratio = f"**{task / ref:.2f}x**" if ref else "-"
    kept = f"{100 * served / theirs:.1f}%" if served is not None and theirs else "-"
    return (f"| {name} | {r.train_config.get('precision', 'fp32')} | {r.train_examples} | {sec(ref)} | {sec(search)} | "
            f"{sec(s.get('students'))} | {sec(s.get('shallower_students'))} | {sec(task)} | {ratio} | "
            f"{pct(served)} | {pct(theirs)} | {kept} |")


def cost_table(reports: dict[str, TrainingReport]) -> str:
    return "\n".join([HEADER, "|" + "---|" * HEADER.count(" | ") + "---|",
                      *(cost_row(name, r) for name, r in reports.items())])
