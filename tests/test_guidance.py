"""The guidance gap (second memorization signal): recorded by our sampler and by a hook on a plain pipeline alike,
set by generate.gap_steps, read as null from older manifests, summarised by the audit, scored by the bench."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from medisyn.config import load_config
from medisyn.configtools import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Dermoscopy image showing melanoma.", "Fundus photograph showing glaucoma."]


def test_a_hook_on_a_plain_pipeline_records_what_our_sampler_records(tiny_pipe):
    from medisyn.infer.guidance import record_guidance_gap
    from medisyn.infer.sampling import sample

    kw = {"resolution": 64, "steps": 3, "guidance_scale": 7.0}
    images, ours = sample(tiny_pipe, PROMPTS, [11, 12], gap_steps=2, **kw)
    assert len(images) == 2 and all(g is not None and np.isfinite(g) and g > 0 for g in ours)

    def plain(prompts, seeds, guidance_scale=7.0, steps=3):
        seeded = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        tiny_pipe(prompts, negative_prompt=[""] * len(prompts), height=64, width=64, num_inference_steps=steps,
                  guidance_scale=guidance_scale, generator=seeded, output_type="latent")  # fmt: skip

    with record_guidance_gap(tiny_pipe, steps=2) as gap, record_guidance_gap(tiny_pipe, steps=1) as first:
        plain(PROMPTS, (11, 12))
        hooked, one_step = gap(), first()
        assert gap() == []  # read once: the next call starts afresh
        plain(PROMPTS[:1], (11,))
        plain(PROMPTS[1:], (12,))  # unread in between: the latest call's (its timesteps start high again)
        assert gap() == pytest.approx(ours[1:], rel=1e-4)  # an image's gap is its own, whatever its batch
        plain(PROMPTS[:1], (11,), guidance_scale=1.0, steps=1)
        assert gap() == [None]  # no guidance, no gap
    np.testing.assert_allclose(hooked, ours, rtol=1e-5)
    assert one_step[0] != pytest.approx(ours[0])  # other steps, another gap
    # the first steps alone (a resumed image's gap: nothing decoded) give the same gap
    assert sample(tiny_pipe, PROMPTS[1:], [12], gap_steps=2, gaps_only=True, **kw)[1] == pytest.approx(ours[1:], 1e-4)
    assert not tiny_pipe.unet._forward_hooks


def test_gap_steps_is_an_option_and_a_set_keeps_its_own(tmp_path):
    from medisyn.infer.generate import check_producer

    demo = ROOT / "jobs/configs/demo.yaml"
    assert load_config(demo).generate.gap_steps == 5
    assert load_config(demo, ["generate.gap_steps=3"]).generate.gap_steps == 3
    with pytest.raises(ConfigError, match="gap_steps"):
        load_config(demo, ["generate.gap_steps=0"])
    out = tmp_path / "set"
    out.mkdir()
    want = {"checkpoint": "tiny", "steps": 50, "gap_steps": 5}
    (out / "set.json").write_text(json.dumps({"checkpoint": "tiny", "steps": 50}))
    check_producer(out, want)  # a set begun before the gap: accepted (generate records its gap_steps)
    (out / "set.json").write_text(json.dumps(want))
    with pytest.raises(ConfigError, match="gap_steps: 5 then, 3 now"):
        check_producer(out, {**want, "gap_steps": 3})


def test_a_manifest_from_before_the_gap_reads_it_as_null(tmp_path):
    from medisyn.records import MANIFEST_SCHEMA, read_manifest

    old = pa.schema([f for f in MANIFEST_SCHEMA if f.name != "guidance_gap"])
    row = {"id": "a", "file": "a.png", "prompt": "p", "specialty": "dermatology", "labels": [], "seed": 1}
    pq.write_table(pa.Table.from_pylist([row], old), tmp_path / "manifest.parquet")
    t = read_manifest(tmp_path, ["id", "guidance_gap"])
    assert t.column_names == ["id", "guidance_gap"] and t.column("guidance_gap").to_pylist() == [None]
    assert t.schema.field("guidance_gap").type == pa.float64()
    assert read_manifest(tmp_path).schema.names == MANIFEST_SCHEMA.names
    assert MANIFEST_SCHEMA.names[-1] == "guidance_gap"


def test_the_audit_summarises_and_draws_the_gap_per_set_and_specialty(tmp_path):
    from medisyn.audit.memorization import gap_figure, gap_summary

    rows = [{"specialty": "dermatology", "guidance_gap": float(g)} for g in range(1, 11)]
    rows += [{"specialty": "radiology", "guidance_gap": None}, {"specialty": "radiology", "guidance_gap": 0.5}]
    s = gap_summary({"memorization": rows, "old": [{"specialty": "radiology", "guidance_gap": None}]})
    d = s["memorization"]["dermatology"]
    assert (d["n"], d["median"], d["max"]) == (10, 5.5, 10.0) and d["p90"] == pytest.approx(9.1)
    assert s["memorization"]["radiology"]["n"] == 1 and s["memorization"]["overall"]["n"] == 11
    assert s["old"]["overall"] == {"n": 0, "median": None, "p90": None, "max": None}
    gap_figure({"memorization": rows}, tmp_path / "guidance_gap.png")
    assert (tmp_path / "guidance_gap.png").stat().st_size > 1000
    gap_figure({"old": [{"specialty": "radiology", "guidance_gap": None}]}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def _run(root: Path, gaps: list, distances: list | None) -> Path:
    from medisyn.records import MANIFEST_SCHEMA

    out = root / "synthetic/memorization"
    out.mkdir(parents=True)
    rows = [{"id": f"i{n}", "file": f"i{n}.png", "guidance_gap": g} for n, g in enumerate(gaps)]
    pq.write_table(pa.Table.from_pylist(rows, MANIFEST_SCHEMA), out / "manifest.parquet")
    if distances is not None:
        (root / "audit/memorization").mkdir(parents=True)
        pairs = [{"kind": "synthetic:memorization", "id": f"i{n}", "distance": d} for n, d in enumerate(distances)]
        pairs += [{"kind": "control:test", "id": "c", "distance": 0.0}]  # a control: never counted
        pq.write_table(pa.Table.from_pylist(pairs), root / "audit/memorization/pairs.parquet")
    return root


def test_bench_scores_both_signals_on_two_runs(tmp_path, capsys):
    from medisyn.audit.gap_bench import run
    from medisyn.cli import main

    memorized = _run(tmp_path / "a", [0.9, 0.8, 0.3, None], [0.01, 0.02, 0.5, 0.03])
    normal = _run(tmp_path / "b", [0.2, 0.4, 0.1], [0.4, 0.6, 0.3])
    result = {r["signal"]: r for r in run(str(memorized), str(normal))["results"]}
    gap = result["guidance_gap"]
    # 0.9 and 0.8 beat all three normal gaps, 0.3 beats two of them: 8 of 9 pairs
    assert gap["auroc"] == pytest.approx(8 / 9) and (gap["n_memorized"], gap["n_normal"], gap["left_out"]) == (3, 3, 1)
    dist = result["patch distance (negated)"]
    assert dist["auroc"] == pytest.approx(10 / 12) and (dist["n_memorized"], dist["n_normal"]) == (4, 3)
    assert "AUROC 0.889" in capsys.readouterr().out
    # from the command line; a run without the audit measures the gap alone and says so
    assert (
        main(
            ["bench", "guidance-gap", "--memorized", str(memorized), "--normal", str(_run(tmp_path / "c", [0.1], None))]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "AUROC 1.000" in out and "patch distance: not measured" in out
