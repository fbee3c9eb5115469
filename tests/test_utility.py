"""The utility audit: task files, arm invariants, the bootstrap against scikit-learn, DeLong,
the classifier loop (with resume), and the Tune audit resuming only what did not finish."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medisyn.audit.arms import ARMS, Task, allocate, draw_arms, load_tasks, strata
from medisyn.audit.stats import (
    bootstrap_auroc_diff,
    bootstrap_aurocs,
    delong_diff,
    indicator,
    resample_indices,
    two_level_bootstrap_diff,
)
from medisyn.configtools import ConfigError

MC = Task("derm", "dermatology", "dermoscopy", "multiclass", ("a", "b", "c", "d"), "utility")
ML = Task("cxr", "radiology", "X-ray", "multilabel", ("w", "x", "y", "z"), "utility")


# --- tasks ---


def test_shipped_task_files_load_and_bad_ones_name_the_problem(tmp_path):
    paper = load_tasks("paper")
    assert [t.name for t in paper] == ["chest-xray", "dermoscopy", "prostatectomy"]
    assert paper[0].multilabel and not paper[1].multilabel and len(paper[2].classes) == 4
    assert [t.sources for t in load_tasks("demo")] == [("chexpert",), ("isic2019",), ("sar-rarp50",)]
    assert [t.name for t in load_tasks("demo", ("dermoscopy",))] == ["dermoscopy"]
    with pytest.raises(ConfigError, match="unknown task 'ct'"):
        load_tasks("paper", ("ct",))
    bad = tmp_path / "t.yaml"
    good = "name: t\n    specialty: surgery\n    image_type: endoscopy\n    synthetic_set: s\n"
    for body, message in (
        ("kind: multiclass\n    classes: [a, b]\n    colour: red", "unknown key 'colour'"),
        ("kind: ordinal\n    classes: [a, b]", "kind must be multiclass or multilabel"),
        ("kind: multiclass\n    classes: [a]", "at least two distinct"),
    ):
        bad.write_text(f"tasks:\n  - {good}    {body}\n")
        with pytest.raises(ConfigError, match=message):
            load_tasks(str(bad))


def test_task_membership_multiclass_needs_one_class_multilabel_at_least_one():
    assert MC.truth(["b"]).tolist() == [False, True, False, False]
    assert MC.truth(["a", "b"]) is None and MC.truth(["other"]) is None
    assert ML.truth(["w", "z"]).tolist() == [True, False, False, True]
    assert ML.truth(["other"]) is None


def test_a_task_whose_sources_ship_no_val_split_holds_train_patients_out(monkeypatch):
    """SAR-RARP50 and CBIS-DDSM ship train and test only: the task's val split is a fixed share of its
    train patients (whole patients, the same every run); a corpus with a val split is used as it is."""
    import pyarrow as pa

    from medisyn.audit import utility

    rows = [
        {
            "id": f"i{k}",
            "labels": [MC.classes[k % 4]],
            "split": "test" if k >= 64 else "train",
            "patient_id": f"p{k // 4}",
        }
        for k in range(80)
    ] + [{"id": "x", "labels": ["other"], "split": "train", "patient_id": "p0"}]
    monkeypatch.setattr(utility, "read_corpus", lambda *a, **k: pa.Table.from_pylist(rows))
    out = utility.task_rows("corpus", MC)
    by_id = {r["id"]: r["patient_id"] for r in rows}
    val = {by_id[i] for i in out["val"]["ids"]}
    assert len(val) == 2 and not val & {by_id[i] for i in out["train"]["ids"]}  # 2 of 16 train patients, whole
    assert len(out["val"]["ids"]) == 8 and len(out["train"]["ids"]) == 56 and len(out["test"]["ids"]) == 16
    assert utility.task_rows("corpus", MC)["val"]["ids"] == out["val"]["ids"]  # the same patients every run
    rows[0]["split"] = "val"  # the corpus has a val split: nothing is held out of train
    kept = utility.task_rows("corpus", MC)
    assert kept["val"]["ids"] == ["i0"] and len(kept["train"]["ids"]) == 63


# --- arms ---


def _class_counts(y, rows):
    return y[rows].sum(axis=0)


@pytest.mark.parametrize("task", [MC, ML], ids=["multiclass", "multilabel"])
def test_arm_invariants(task):
    rng = np.random.default_rng(0)
    if task.multilabel:
        train = rng.random((300, 4)) < [0.5, 0.3, 0.2, 0.1]
        train[~train.any(axis=1), 0] = True
    else:
        train = indicator(rng.choice(4, 300, p=[0.4, 0.3, 0.2, 0.1]), 4)
    synth = indicator(np.repeat(np.arange(4), 60), 4)
    arms = draw_arms(task, train, synth, 120, 60, 60, seed=7)
    full, half, hs, twice = (arms[a] for a in ARMS)
    assert set(half.real) <= set(full.real) and len(set(full.real)) == 120 and len(half.real) == 60
    assert np.array_equal(hs.real, half.real) and len(hs.synthetic) == 60 and len(set(hs.synthetic)) == 60
    assert sorted(twice.real.tolist()) == sorted(half.real.tolist() * 2) and twice.size == hs.size == 120
    # class-matched: each arm's strata keep the pool's shares within ±1 (label combinations for multi-label)
    pool_strata = strata(train)
    for rows, n in ((full.real, 120), (half.real, 60)):
        for k in np.unique(pool_strata):
            want = n * np.mean(pool_strata == k)
            assert abs(np.sum(pool_strata[rows] == k) - want) < 1 + 1e-9
    # synthetic per class follows (ii)'s class (label) counts, scaled to its size, within ±1
    want = 60 * _class_counts(train, half.real) / _class_counts(train, half.real).sum()
    assert np.all(np.abs(_class_counts(synth, hs.synthetic) - want) < 1 + 1e-9)
    again = draw_arms(task, train, synth, 120, 60, 60, seed=7)
    other = draw_arms(task, train, synth, 120, 60, 60, seed=8)
    assert np.array_equal(again["real_half"].real, half.real) and not np.array_equal(other["real_full"].real, full.real)


def test_multi_finding_synthetic_images_are_matched_by_label_combination():
    """A set prompted with the corpus's multi-finding captions (~30% of a chest X-ray corpus) is
    drawn per label combination in (ii)'s shares, so (iii) keeps (ii)'s multi-finding share."""
    combos = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 1]], bool)
    train = combos[np.repeat(np.arange(6), [80, 80, 60, 60, 80, 40])]  # 30% show several findings
    synth = combos[np.repeat(np.arange(6), 40)]
    arms = draw_arms(ML, train, synth, 200, 100, 100, seed=3)
    half, picked = arms["half_synth"].real, arms["half_synth"].synthetic
    for c in combos:
        want = 100 * np.mean((train[half] == c).all(axis=1))
        assert abs(np.sum((synth[picked] == c).all(axis=1)) - want) < 1 + 1e-9
    assert abs(np.mean(synth[picked].sum(axis=1) > 1) - 0.3) < 0.02
    with pytest.raises(ConfigError, match=r"needs \d+ synthetic images of 'x \+ y \+ z'.*it has 2"):
        draw_arms(ML, train, np.concatenate([synth[:200], combos[[5, 5]]]), 200, 100, 100, seed=3)


def test_arm_sizes_the_data_cannot_meet_are_named():
    train = indicator(np.arange(40) % 4, 4)
    synth = indicator(np.array([0, 0, 1, 1, 2, 2, 3]), 4)
    with pytest.raises(ConfigError, match="has 40 train images; audit_utility.real_full is 50"):
        draw_arms(MC, train, synth, 50, 20, 8, seed=0)
    with pytest.raises(ConfigError, match="2 synthetic images of 'd'.*it has 1"):
        draw_arms(MC, train, synth, 40, 20, 8, seed=0)
    assert allocate(7, [1, 1, 1]).tolist() == [3, 2, 2] and allocate(0, [1, 2]).tolist() == [0, 0]


# --- statistics ---


def _scorers(n, c, seed=0, multilabel=True):
    rng = np.random.default_rng(seed)
    y = rng.random((n, c)) < 0.3 if multilabel else rng.integers(0, c, n)
    yi = indicator(y, c)
    a = np.round(yi * 0.8 + rng.random((n, c)), 2)  # rounded: ties, which the AUROC must count half
    b = np.round(yi * 0.3 + rng.random((n, c)), 2)
    if not multilabel:
        a, b = a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)
    return y, a, b


@pytest.mark.parametrize("multilabel", [True, False], ids=["multilabel", "multiclass"])
@pytest.mark.parametrize("stratified", [False, True], ids=["plain", "stratified"])
def test_bootstrap_equals_a_plain_sklearn_loop(multilabel, stratified):
    y, a, b = _scorers(400, 4, seed=1, multilabel=multilabel)
    kw = {"average": "macro"} if multilabel else {"multi_class": "ovr", "average": "macro"}
    diffs = [
        roc_auc_score(y[i], a[i], **kw) - roc_auc_score(y[i], b[i], **kw)
        for i in resample_indices(y, 300, seed=5, stratified=stratified)
    ]
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    full = roc_auc_score(y, a, **kw) - roc_auc_score(y, b, **kw)
    got = bootstrap_auroc_diff(y, a, b, n_resamples=300, seed=5, multilabel=multilabel, stratified=stratified)
    assert got == pytest.approx((full, lo, hi), abs=1e-12)
    assert got[1] > 0  # the better scorer's CI excludes 0
    same = bootstrap_auroc_diff(y, a, a.copy(), n_resamples=300, seed=5, multilabel=multilabel)
    assert same == (0.0, 0.0, 0.0)


def test_resamples_missing_a_class_are_dropped_and_counted_unless_stratified():
    y = np.r_[np.zeros(60, int), np.ones(60, int), np.full(2, 2)]  # class 2: two cases
    _, a, b = _scorers(len(y), 3, seed=2, multilabel=False)
    plain = bootstrap_aurocs(y, {"a": a, "b": b}, n_resamples=400, seed=0)
    assert 0 < plain["dropped"] < 400 and len(plain["samples"]["a"]) == 400 - plain["dropped"]
    assert bootstrap_aurocs(y, {"a": a}, n_resamples=400, seed=0, stratified=True)["dropped"] == 0


def test_delong_and_bootstrap_standard_errors_agree():
    rng = np.random.default_rng(3)
    y = rng.random(3000) < 0.4
    a, b = y + rng.normal(0, 1, 3000), 0.7 * y + rng.normal(0, 1, 3000)
    dl = delong_diff(y, a, b)
    res = bootstrap_aurocs(y.astype(int), {"a": np.c_[-a, a], "b": np.c_[-b, b]}, n_resamples=2000, seed=0)
    boot_se = np.std(res["samples"]["a"] - res["samples"]["b"], ddof=1)
    assert dl["diff"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    assert abs(dl["se"] / boot_se - 1) < 0.10 and dl["lo"] > 0 and dl["p"] < 0.05


def test_two_level_bootstrap_carries_the_seed_spread():
    y, a, b = _scorers(600, 4, seed=4)
    rng = np.random.default_rng(0)
    noisy = [np.where(rng.random(a.shape) < 0.5 * k, rng.random(a.shape), a) for k in range(3)]  # seeds differ a lot
    one = bootstrap_auroc_diff(y, noisy[0], b, n_resamples=500, seed=1, multilabel=True)
    two = two_level_bootstrap_diff(y, noisy, [b, b, b], n_resamples=500, seed=1)
    assert two[2] - two[1] > 1.5 * (one[2] - one[1])
    assert two[1] < two[0] < two[2]


# --- the classifier loop ---


def _colour_data(n, size=32, seed=0, classes=3):
    """Images whose class is their dominant colour channel, plus noise."""
    rng = np.random.default_rng(seed)
    cls = np.arange(n) % classes
    x = rng.integers(0, 120, (n, size, size, 3))
    x[np.arange(n), :, :, cls] += 120
    return x.astype(np.uint8), indicator(cls, classes)


def test_fit_learns_keeps_the_best_epoch_and_resumes_exactly():
    from medisyn.audit.classifier import FitSettings, fit

    train, val, test = _colour_data(48), _colour_data(24, seed=1), _colour_data(24, seed=2)
    s = FitSettings(arch="resnet18", num_classes=3, epochs=4, batch_size=8, learning_rate=1e-3, seed=3)
    seen = []
    full = fit(train, val, test, s, on_epoch=lambda st: seen.append((st.epoch, st.steps, st.best_epoch)))
    assert [e for e, _, _ in seen] == [1, 2, 3, 4] and full.steps == 24
    assert full.best_val_auroc == max(h["val_auroc"] for h in full.history) > 0.9
    assert full.best_epoch == 1 + int(np.argmax([h["val_auroc"] for h in full.history]))
    assert roc_auc_score(test[1], full.test_scores, average="macro") > 0.9

    snapshots = []
    fit(train, val, test, s, on_epoch=lambda st: snapshots.append(__import__("copy").deepcopy(st)) or None)
    resumed = fit(train, val, test, s, state=snapshots[1])  # as if killed after epoch 2
    assert resumed.epoch == 4 and resumed.steps == full.steps
    np.testing.assert_allclose(resumed.test_scores, full.test_scores, atol=1e-5)

    equal = fit(train, val, test, FitSettings(**{**s.__dict__, "steps": 9}))  # equal_steps: 9 optimizer steps
    assert equal.steps == 9 and equal.epoch == 2


def test_weights_from_a_file_and_the_offline_imagenet_fallback(tmp_path, monkeypatch):
    import urllib.error

    import torch
    import torchvision

    from medisyn.audit.classifier import build_classifier, resolve_weights

    torch.manual_seed(1)
    donor = torchvision.models.resnet18(weights=None)
    torch.save(donor.state_dict(), tmp_path / "r18.pt")
    model = build_classifier("resnet18", 5, str(tmp_path / "r18.pt"))
    assert torch.equal(model.conv1.weight, donor.conv1.weight) and model.fc.out_features == 5
    assert build_classifier("resnet50", 4).fc.in_features == 2048  # the paper's backbone, new 4-class head
    with pytest.raises(ValueError, match="not a resnet50 state dict"):
        build_classifier("resnet50", 5, str(tmp_path / "r18.pt"))
    assert resolve_weights("resnet18", str(tmp_path / "r18.pt")) == (str(tmp_path / "r18.pt"), "from r18.pt")
    assert resolve_weights("resnet18", "none") == ("none", "random initialisation")
    with pytest.raises(ConfigError, match="not none, imagenet or an existing file"):
        resolve_weights("resnet18", str(tmp_path / "missing.pt"))
    tried = []

    def offline(url, *args, **kwargs):  # as on CI: no hub, and never a real download from a test
        tried.append(url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    what, note = resolve_weights("resnet18", "imagenet")  # unreachable: labelled random init
    assert what == "none" and "ImageNet weights unavailable" in note and tried


# --- the Tune audit on the phantom corpus ---


@pytest.fixture()
def utility_run(ingested, tmp_path):
    from conftest import fake_synthetic_set

    cfg, run_dir, _ = ingested
    (tmp_path / "corpus").symlink_to(run_dir / "corpus")
    fake_synthetic_set(tmp_path)
    return tmp_path


def _cfg(run_dir, *overrides):
    from pathlib import Path

    from medisyn.config import load_config

    root = Path(__file__).resolve().parents[1]
    base = [
        f"run_dir={run_dir}",
        "audit_utility.tasks=[dermoscopy]",
        "audit_utility.seeds=1",
        "audit_utility.real_full=16",
        "audit_utility.real_half=8",
        "audit_utility.synthetic=8",
        "audit_utility.arch=resnet18",
        "audit_utility.image_size=32",
        "audit_utility.batch_size=8",
        "audit_utility.bootstrap_resamples=200",
    ]
    return load_config(root / "jobs/configs/demo.yaml", base + list(overrides))


@pytest.mark.ray
def test_a_stopped_audit_resumes_only_the_unfinished_trials(utility_run, monkeypatch, caplog, capsys):
    import json

    from medisyn.audit.utility import FAULT_ENV
    from medisyn.audit.utility import run as audit

    cfg = _cfg(utility_run, "audit_utility.epochs=2", "audit_utility.max_failures=0")
    preds = utility_run / "audit/utility/predictions/dermoscopy"
    monkeypatch.setenv(FAULT_ENV, "half_twice")
    with (
        caplog.at_level("INFO", logger="medisyn"),
        pytest.raises(RuntimeError, match=r"1 trial\(s\) failed: dermoscopy/half_twice/seed0"),
    ):
        audit(cfg)
    lines = [r.getMessage() for r in caplog.records if "audit-utility: trial" in r.getMessage()]
    assert len(lines) == 4 and "audit-utility: trial 4/4" in lines[-1] and sum("FAILED" in x for x in lines) == 1
    assert "completed after" not in capsys.readouterr().out  # one line per trial, not Tune's two tables
    done = {p.name: p.stat().st_mtime_ns for p in preds.glob("*.parquet")}
    assert sorted(done) == ["half_synth-seed0.parquet", "real_full-seed0.parquet", "real_half-seed0.parquet"]

    monkeypatch.delenv(FAULT_ENV)
    summary = audit(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in preds.glob("*.parquet") if p.name in done} == done  # not rerun
    assert (preds / "half_twice-seed0.parquet").is_file()
    arms = summary["tasks"]["dermoscopy"]["arms"]
    assert [arms[a]["size"] for a in ARMS] == [16, 8, 16, 16] and arms["real_half"]["steps"] == [2]
    assert summary["weights"] == "random initialisation"
    out = utility_run / "audit/utility"
    assert json.loads((out / "summary.json").read_text())["experiment"] == summary["experiment"]
    assert (out / "dermoscopy-roc.png").stat().st_size > 1000 and (out / "predictions.parquet").is_file()
    assert not list((out / "tune").rglob("checkpoint_*"))  # finished trials keep no checkpoint
    stamp = (out / "summary.json").stat().st_mtime_ns  # resubmitted with other resources: passed, not redone
    again = audit(_cfg(utility_run, "audit_utility.epochs=2", "audit_utility.max_failures=2"))
    assert again["experiment"] == summary["experiment"] and (out / "summary.json").stat().st_mtime_ns == stamp

    # killed mid-trial: Tune restarts it from the epoch-1 checkpoint (a new plan: epochs=3)
    cfg3 = _cfg(utility_run, "audit_utility.epochs=3", "audit_utility.max_failures=1", "audit_utility.checkpoint=true")
    monkeypatch.setenv(FAULT_ENV, "real_half@1")
    audit(cfg3)
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(preds / "real_half-seed0.parquet").metadata[b"medisyn"])
    assert meta["resumed_at_epoch"] == 1 and [h["epoch"] for h in meta["history"]] == [1, 2, 3]


@pytest.mark.ray
def test_plan_records_every_arm_and_equal_steps_matches_arm_one(utility_run):
    import pyarrow.parquet as pq

    from medisyn.audit.utility import plan_task

    task = load_tasks("demo", ("chest-xray",))[0]
    cfg = _cfg(utility_run, "audit_utility.equal_steps=true", "audit_utility.seeds=2", "audit_utility.epochs=3")
    plan, todo = plan_task(cfg, task, "none")
    assert plan.equal_steps == 3 * 2  # arm (i): 16 images in batches of 8, 3 epochs
    assert todo["size"] == 32 and len(todo["real_ids"]) == len(plan.real_y) == plan.test[-1] + 1
    arms = pq.read_table(utility_run / "audit/utility/arms/chest-xray.parquet").to_pandas()
    sizes = arms.groupby(["seed", "arm"]).size().unstack()
    assert sizes.loc[0].to_dict() == {"half_synth": 16, "half_twice": 16, "real_full": 16, "real_half": 8}
    assert sorted(arms.draw_seed.unique()) == [0, 1] and set(arms.origin) == {"real", "synthetic"}
    assert arms[arms.origin == "synthetic"].arm.unique().tolist() == ["half_synth"]
    val_test = set(plan.val) | set(plan.test)
    assert not any(set(a.real) & val_test for a in plan.arms.values())  # no arm trains on a val or test row
