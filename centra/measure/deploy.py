"""The multilingual deployment: the recipes of recipes/multilingual (sentiment in 8 languages, PLUE's
Portuguese SST-2, two IndoNLU hotel aspects) on one trunk, merged (int8 too) and checked: merged against
standalone, and the answers served over gRPC (centra.v1) and REST against in-process ones."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

from centra.errors import CentraError
from centra.io import read_json
from centra.measure.umsab import LANGUAGES, read_jsonl
from centra.progress import progress_line

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "multilingual"
SAMPLE = 24  # test texts per language or data set in the checks and the bench texts


def recipes(backbone: str) -> list[Path]:
    """The deployment's recipe files, each checked to name `backbone` (refused before any training)."""
    found = sorted(RECIPES.glob("*/recipe.json"))
    if not found:
        raise CentraError(f"{RECIPES}: no recipes (the multilingual deployment's recipe folders)")
    for recipe in found:
        named = read_json(recipe).get("backbone")
        if named != backbone:
            raise CentraError(f"{recipe}: names backbone {named!r}, not {backbone!r}: the deployment trains "
                              "on the backbone its recipes name")
    return found


def deploy(files: dict[str, dict[str, Path]], out: Path, data: Path, backbone: str, run_a: dict | None,
           progress: bool = False, int8_fp32: tuple[str, ...] = ()) -> dict:
    """Train (or reuse) the recipes' tasks into OUT/deploy/tasks, merge them into OUT/deploy/merged (the
    int8 graphs keeping the node groups `int8_fp32` in fp32) and check them. The sentiment task is run
    (a)'s when (a) trained with the recipe's settings (`run_a`: its results entry), else it is trained
    from the recipe."""
    from centra.export.engines import merge
    from centra.runtime.engine import Engine
    from centra.runtime.verify import verify
    from centra.train.recipe import add_task

    tasks = out / "deploy" / "tasks"
    entry: dict = {"tasks": {}}
    for recipe in recipes(backbone):
        name = recipe.parent.name
        (tasks / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(recipe, tasks / name / "recipe.json")
        clock = time.perf_counter()
        trained_a = out / "a" / "tasks" / name
        if name == "sentiment" and same_settings(read_json(recipe), run_a, trained_a):
            copy_task(trained_a, tasks / name, recipe)
            entry["tasks"][name] = {"from": str(trained_a)}
        else:
            root = files["all"]["train"].parent if name == "sentiment" else data
            report, _ = add_task(tasks, name, root=root)
            entry["tasks"][name] = {"chosen": report.to_dict()["chosen"],
                                    "seconds": round(time.perf_counter() - clock, 1)}
        progress_line(f"languages deploy: {name} ready")
    manifest = merge([tasks], out / "deploy" / "merged", engine="onnx", precision="int8", int8_fp32=int8_fp32,
                     progress=progress)
    texts = sample_texts(files, data)
    (out / "deploy" / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    engine = Engine.load(out / "deploy" / "merged", engine="torch")
    checks = verify(engine, texts[:64], texts[:64])  # no pair task here: the pairs are never read
    entry |= {"merged_vs_standalone": max(c.max_abs_diff for c in checks),
              "served": served_equal(engine, texts[:48]), "overhead_layers": manifest.overhead_layers,
              "single_task_layers": manifest.single_task_layers}
    return entry


def same_settings(recipe: dict, run_a: dict | None, task: Path) -> bool:
    """Run (a) trained sentiment as the recipe says (its training settings and metric) on the backbone the
    recipe names, as installed now (its fingerprint: the same weights and text prefix)."""
    from centra.core.backbone import Backbone

    if not run_a or not (task / "task.json").is_file():
        return False
    done, wanted = run_a.get("settings", {}), recipe.get("training", {})
    keys = ("epochs", "layers", "extra_attach")
    if [done.get(k) for k in keys] + [done.get("seed", 0)] != [wanted.get(k) for k in keys] + [wanted.get("seed", 0)]:
        return False
    if wanted.get("metric") != "macro_f1" or done.get("backbone", recipe.get("backbone")) != recipe.get("backbone"):
        return False
    recorded = read_json(task / "task.json").get("backbone", {}).get("fingerprint")
    return recorded == Backbone.load(recipe["backbone"]).fingerprint


def copy_task(source: Path, dest: Path, recipe: Path) -> None:
    """Publish a copy of a trained task folder (with the recipe its settings match) through centra's one
    publishing step: staged, loaded, then swapped in."""
    from centra.core.task import RECIPE_FILE, TASK_KIND, is_legacy_task, read_task_json
    from centra.publish import ARTIFACT_FILE, publish_folder

    def build(stage: Path) -> None:
        for item in source.iterdir():
            if item.is_file() and item.name not in (ARTIFACT_FILE, RECIPE_FILE):
                shutil.copyfile(item, stage / item.name)
            elif item.is_dir() and not item.is_symlink():  # the candidates `centra plan` chooses from
                shutil.copytree(item, stage / item.name)
        shutil.copyfile(recipe, stage / RECIPE_FILE)

    publish_folder(dest, TASK_KIND, build, lambda stage: read_task_json(stage, dest.name), keep=(RECIPE_FILE,),
                   legacy=is_legacy_task)


def sample_texts(files: dict[str, dict[str, Path]], data: Path) -> list[str]:
    """A few test tweets of every language, Portuguese SST-2 and Indonesian hotel reviews, interleaved."""
    groups = [[r["text"] for r in read_jsonl(files[code]["test"])[:SAMPLE]] for code in LANGUAGES.values()]
    sst = data / "plue" / "SST-2" / "dev.tsv"
    if sst.is_file():
        lines = sst.read_text(encoding="utf-8").splitlines()[1:SAMPLE + 1]
        groups.append([line.split("\t")[0] for line in lines])
    hotel = data / "indonlu" / "hoasa_absa-airy" / "test_preprocess.csv"
    if hotel.is_file():
        with open(hotel, encoding="utf-8", newline="") as f:
            groups.append([row["review"] for _, row in zip(range(SAMPLE), csv.DictReader(f))])
    texts = [" ".join(g[i].split()) for i in range(SAMPLE) for g in groups if i < len(g) and g[i].strip()]
    return list(dict.fromkeys(texts))  # each once: answers are matched by text


def served_equal(engine, texts: list[str]) -> dict:
    """The same texts over gRPC (centra.v1) and REST against the engine in process: per door, the answers
    counted, whether every label is the same and the largest score difference."""
    import urllib.request

    from centra.client import Client
    from centra.serve.background import BackgroundServer
    from centra.serve.server import ServeOptions

    local = {(a["text"], a["task"]): a for a in engine.predict(texts)}
    with BackgroundServer(engine, ServeOptions(port=0, http_port=0, drain_s=0)) as server:
        with Client(server.target, timeout=60) as client:
            over_grpc = [(a["text"], a["task"], a.get("label"), a["scores"]) for a in client.classify(texts)]
        body = json.dumps({"inputs": [{"text": t, "id": str(i)} for i, t in enumerate(texts)]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{server.server.http.port}/v1/classify", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            rest = json.loads(response.read())
    over_rest = [(texts[int(r["id"])], a["task"], a.get("label"),
                  dict(zip(engine.specs[a["task"]].labels, a["scores"]))) for r in rest["results"] for a in r["tasks"]]
    out = {}
    for door, answers in (("grpc", over_grpc), ("rest", over_rest)):
        if len(answers) != len(local):
            raise CentraError(f"{door}: {len(answers)} answers served, {len(local)} in process")
        mine = [local[(text, task)] for text, task, _, _ in answers]
        out[door] = {"answers": len(answers),
                     "same_labels": all(label == m.get("label") for (_, _, label, _), m in zip(answers, mine)),
                     "max_score_diff": max(abs(scores[k] - v) for (_, _, _, scores), m in zip(answers, mine)
                                           for k, v in m["scores"].items())}
    return out
