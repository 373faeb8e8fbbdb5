"""Training precision: bf16 where the CPU has it (auto), fp32 when asked; both paths train a tiny model;
the training cache holds bf16 (spilled too), the dev cache fp32, so dev figures are the served fp32 ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_training import job_for, synthetic

from centra import progress
from centra.core.backbone import Backbone
from centra.core.task import load_task
from centra.core.tokens import encode
from centra.train import pipeline, precision
from centra.train.cache import ActivationCache
from centra.train.finetune import predict_cache
from centra.train.pipeline import train_task


@pytest.fixture(scope="module")
def bert(tiny_models) -> Backbone:
    return Backbone.load(tiny_models["bert"])


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("amx_bf16",))
    assert precision.resolve("auto") == "bf16" and "amx_bf16" in precision.notice("auto")
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    assert precision.resolve("auto") == "fp32" and "no bf16 in hardware" in precision.notice("auto")
    assert precision.resolve("bf16") == "bf16" and "slower" in precision.notice("bf16")
    assert precision.resolve("fp32") == "fp32"


def test_cpu_flags_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile amx_bf16\n\n")
    real = precision.Path
    monkeypatch.setattr(precision, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
    precision.cpu_bf16_flags.cache_clear()
    try:
        assert precision.cpu_bf16_flags() == ("amx_bf16", "avx512_bf16")
        info.write_text("flags\t\t: fpu sse avx2\n")
        precision.cpu_bf16_flags.cache_clear()
        assert precision.cpu_bf16_flags() == ()
    finally:
        precision.cpu_bf16_flags.cache_clear()


@pytest.mark.parametrize("chosen", ["fp32", "bf16"])
def test_both_precisions_train_and_record_what_ran(bert, tmp_path, monkeypatch, chosen):
    made: list[ActivationCache] = []
    real = pipeline.ActivationCache

    def keep(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(pipeline, "ActivationCache", keep)
    trained_in: set[torch.dtype] = set()  # what the linear layers computed in while training

    def seen(module, args, output):
        if isinstance(module, torch.nn.Linear) and module.training:
            trained_in.add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(seen)
    job = job_for(tmp_path, "t", "multiclass", False, student_layers=1, precision=chosen, epochs=4)
    try:
        report, student = train_task(job, bert, tmp_path / "tasks")
    finally:
        hook.remove()
    assert trained_in == {torch.bfloat16 if chosen == "bf16" else torch.float32}
    assert report.train_config["precision"] == chosen
    assert [c.dtype for c in made] == [torch.bfloat16 if chosen == "bf16" else torch.float32, torch.float32]
    losses = report.chosen_teacher.log.losses
    assert np.isfinite(losses).all() and np.mean(losses[-4:]) < np.mean(losses[:4]), "training loss must fall"
    assert all(p.dtype == torch.float32 for p in student.parameters()), "weights stay fp32"
    # the dev figure recorded is the fp32 head's on fp32 states: what the served engines compute
    spec, loaded = load_task(tmp_path / "tasks" / "t", bert)
    dev = job_for(tmp_path, "t", "multiclass", False).dev
    tok = bert.tokenizer()
    texts = [line.split("\t")[0] for line in dev.read_text().splitlines()[1:]]
    cache = ActivationCache(bert, encode(tok, bert.cfg.type_vocab_size, texts, None, spec.max_length),
                            tok.pad_token_id, 1 << 30, progress=False)
    cache.build(spec.attach_layer)
    gold = [["neg", "pos"].index(line.split("\t")[1]) for line in dev.read_text().splitlines()[1:]]
    accuracy = float((predict_cache(loaded, cache).argmax(-1) == np.array(gold)).mean())
    assert abs(accuracy - spec.metrics["accuracy"]) < 1e-6
    assert json.loads((tmp_path / "tasks" / "t" / "report.json").read_text())["train_config"]["precision"] == chosen


def test_bf16_changes_the_numbers_fp32_repeats_them(bert, tmp_path):
    """bf16 really runs (its logits differ from fp32's), and fp32 is reproducible to the bit."""
    runs = {}
    for tag, chosen in (("a", "fp32"), ("b", "fp32"), ("c", "bf16")):
        (tmp_path / tag).mkdir()
        job = job_for(tmp_path / tag, "t", "multiclass", False, student_layers=1, precision=chosen)
        _, student = train_task(job, bert, tmp_path / tag / "tasks")
        runs[tag] = torch.cat([p.detach().flatten() for p in student.parameters()])
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.equal(runs["a"], runs["c"])


def test_bf16_cache_in_memory_and_spilled_match_the_trunk(bert, tmp_path):
    tok = bert.tokenizer()
    texts = [" ".join(r) for r in synthetic("multiclass", True, 20, 3)]
    enc = encode(tok, bert.cfg.type_vocab_size, texts, None, 32)
    exact = ActivationCache(bert, enc, tok.pad_token_id, 1 << 30, progress=False)
    exact.build(2)
    rows = [3, 0, 7, 19]
    ref, _ = exact.batch(rows)
    got = []
    for cap, spill in ((1 << 30, None), (0, tmp_path)):
        cache = ActivationCache(bert, enc, tok.pad_token_id, cap, spill, progress=False, dtype=torch.bfloat16)
        assert (cache.spilled is not None) == (spill is not None)
        assert cache.nbytes * 2 == exact.nbytes, "bf16 halves the cache"
        cache.build(1)
        cache.advance_to(2)
        hidden, _ = cache.batch(rows)
        assert hidden.dtype == torch.bfloat16
        # bf16 keeps 8 bits of mantissa: within a few hundredths of LayerNorm-sized states
        assert (hidden.float() - ref).abs().max().item() < 0.1
        got.append(hidden)
        cache.close()
    assert torch.equal(got[0], got[1]), "spilled and in-memory bf16 caches hold the same states"
    assert not list(tmp_path.glob(".activations-*"))
    with pytest.raises(ValueError):
        ActivationCache(bert, enc, tok.pad_token_id, 1 << 30, dtype=torch.float16)


@pytest.mark.parametrize("settings", [{}, {"student_layers": 1, "search": "full"},
                                      {"reference": True, "reference_epochs": 1, "extra_attach": 2}])
def test_the_job_bar_plans_the_work_it_sees(bert, tmp_path, monkeypatch, capsys, settings):
    """One bar over the whole add-task job: the work the stages report stays within the plan (an upper
    bound: halving and the mixed allocation may stop early), replanned once the teacher is chosen (its
    attach layer says how many students there can be), and fills most of that; the job ends with its cost."""
    bars = []

    class Kept(progress.JobBar):
        def __init__(self, total, desc, enabled=True):
            super().__init__(total, desc, enabled)
            self.planned, self.replans = total, []
            bars.append(self)

        def replan(self, remaining):
            self.replans.append((self.done, remaining))
            super().replan(remaining)

    monkeypatch.setattr(progress, "JobBar", Kept)
    job = job_for(tmp_path, "t", "multiclass", False, layers=(1, 3), progress=True, **settings)
    train_task(job, bert, tmp_path / "tasks")
    [bar] = bars
    [(at, remaining)] = bar.replans
    assert bar.done <= bar.planned and 0.5 * (at + remaining) <= bar.done <= at + remaining, \
        (bar.done, bar.planned, at, remaining)
    lines = capsys.readouterr().err
    assert "t: added in" in lines and ("measured" in lines if settings.get("reference") else "estimated" in lines)
