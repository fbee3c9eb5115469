"""The ``audit-utility`` stage: do synthetic images help a classifier as much as real ones?

Per task (``audit_utility.tasks_file``) and seed, four arms are drawn (``medisyn.audit.arms``);
each arm × seed × task is one Ray Tune trial that trains a torchvision ResNet (``classifier``)
and saves its best-validation-epoch test scores. One ``Tuner`` runs them all with per-trial
resources, so arms run side by side on a cluster; its experiment lives under the run directory
(keyed by a digest of everything that decides the trials), and a rerun restores it with
``Tuner.restore``, so finished trials never run again and errored ones resume from their last
checkpoint. The images every trial of a task needs are decoded and resized once, by one Ray
task per task, into ``audit/utility/inputs/`` (memory-mapped by the trials).

Statistics (``medisyn.audit.stats``): paired bootstrap CIs of the macro-AUROC differences
(i)−(ii), (i)−(iii) and (iii)−(iv) on the test set per seed (the paper's, seed 0 in the table),
a seed × test-case bootstrap across seeds, mean ± sd per arm, and per-class DeLong CIs. Outputs:
``audit/utility/summary.json``, ``table.csv``, ``predictions.parquet`` and one ROC figure per
task, all read by the report.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medisyn import storage
from medisyn.audit.arms import ARMS, COMPARISONS, Arm, Task, arm_label, draw_arms, load_tasks, task_needs
from medisyn.audit.classifier import FitSettings, FitState, planned_steps, resolve_weights
from medisyn.config import RunConfig
from medisyn.configtools import to_dict
from medisyn.phrases import check_classes, corpus_phrases
from medisyn.records import (
    atomic_write_bytes,
    atomic_write_table,
    atomic_write_text,
    corpus_identity,
    decode_rgb,
    finished_with,
    read_corpus,
    read_images,
    read_manifest,
    set_identity,
)

log = logging.getLogger(__name__)

RESOURCE_KEYS = ("cpus_per_trial", "gpus_per_trial", "max_failures")  # change how, not what, it computes
FAULT_ENV = "MEDISYN_FAULT_UTILITY"  # "<arm>[@<epoch>]": that arm's trials fail (tests of resume)

# The paper's differences (DESIGN §2), set beside ours in the report: (i)−(ii) and (i)−(iii).
PAPER_DIFFS = {
    "chest-xray": {"real_full-real_half": (0.040, 0.030, 0.050), "real_full-half_synth": (-0.010, -0.020, 0.001)},
    "dermoscopy": {"real_full-real_half": (0.043, 0.030, 0.055), "real_full-half_synth": (-0.001, -0.012, 0.009)},
    "prostatectomy": {"real_full-real_half": (0.045, 0.039, 0.051), "real_full-half_synth": (-0.011, -0.017, -0.004)},
}


@dataclass(frozen=True)
class TaskPlan:
    """Everything a trial of one task needs, small enough to ship to every trial."""

    task: Task
    real_path: str  # [N, S, S, 3] uint8: the train rows some arm uses, then val, then test
    synthetic_path: str  # [M, S, S, 3] uint8: the synthetic rows some arm uses
    real_y: np.ndarray  # [N, C] bool
    synth_y: np.ndarray  # [M, C] bool
    val: np.ndarray  # positions into real
    test: np.ndarray  # positions into real
    test_ids: tuple[str, ...]
    arms: dict  # (arm, seed) -> Arm over positions into real / synthetic
    draw_seeds: tuple[int, ...]  # the recorded seed of each trial seed index
    settings: FitSettings  # seed and steps filled in per trial
    equal_steps: int  # optimizer steps of arm (i) when audit_utility.equal_steps, else 0
    predictions_dir: str
    checkpoint: bool
    cpus: float
    fault: str = ""


# --- planning: rows, arms, inputs ---


VAL_FROM_TRAIN = 0.125  # of a task's train patients, when its sources ship only train and test (SAR-RARP50, CBIS-DDSM)


def _val_from_train(task: Task, rows: list) -> set[str]:
    """Patients held out of train as the task's val split, when its repositories have none: a fixed share
    of the train patients, picked by a hash of their (already salted) ids, so every run picks the same
    ones and no patient is in two splits."""
    patients = sorted({r["patient_id"] for r, _ in rows if r["split"] == "train"})
    if len(patients) < 2:
        return set()
    ranked = sorted(patients, key=lambda p: hashlib.sha256(f"{task.name}/{p}".encode()).hexdigest())
    picked = set(ranked[: max(1, round(VAL_FROM_TRAIN * len(patients)))])
    log.info(
        "audit-utility: task %s: its sources have no val split; %d of %d train patients held out as val",
        task.name,
        len(picked),
        len(patients),
    )
    return picked


def task_rows(corpus: Path, task: Task) -> dict[str, dict]:
    """Per split, the task's rows: ``{"ids": [...], "y": [n, C] bool}`` in corpus order."""
    where = (pc.field("specialty") == task.specialty) & (pc.field("image_type") == task.image_type)
    if task.sources:
        where = where & pc.field("source").isin(list(task.sources))
    table = read_corpus(corpus, ["id", "labels", "split", "patient_id"], where=where)
    rows = [(r, y) for r in table.to_pylist() if (y := task.truth(r["labels"] or [])) is not None]
    held_out = _val_from_train(task, rows) if not any(r["split"] == "val" for r, _ in rows) else set()
    out = {s: {"ids": [], "y": []} for s in ("train", "val", "test")}
    for row, y in rows:
        split = "val" if row["split"] == "train" and row["patient_id"] in held_out else row["split"]
        out[split]["ids"].append(row["id"])
        out[split]["y"].append(y)
    for split, part in out.items():
        part["y"] = np.array(part["y"], dtype=bool).reshape(-1, len(task.classes))
        if split != "train" and len(part["ids"]) and not (part["y"].any(axis=0)).all():
            missing = [c for c, seen in zip(task.classes, part["y"].any(axis=0), strict=True) if not seen]
            log.warning("audit-utility: task %s: the %s split has no image of %s", task.name, split, missing)
    if not out["val"]["ids"] or not out["test"]["ids"]:
        raise ValueError(
            f"audit-utility: task {task.name!r} has {len(out['val']['ids'])} val and {len(out['test']['ids'])} test "
            "images; it needs both splits (check its specialty, image_type, sources and classes)"
        )
    return out


def synthetic_rows(set_dir: Path, task: Task) -> dict:
    """The set's images prompted with one of the task's classes: ids, files, [m, C] truths."""
    rows = read_manifest(set_dir, ["id", "file", "specialty", "image_type", "labels"]).to_pylist()
    keep = [
        r
        for r in rows
        if r["specialty"] == task.specialty
        and r["image_type"] == task.image_type
        and task.truth(r["labels"] or []) is not None
    ]
    return {
        "ids": [r["id"] for r in keep],
        "files": [r["file"] for r in keep],
        "y": np.array([task.truth(r["labels"]) for r in keep], dtype=bool).reshape(-1, len(task.classes)),
    }


def write_inputs(corpus: str, real_ids: list[str], set_dir: str, files: list[str], size: int, out: dict) -> None:
    """Ray task: decode and resize a task's images once, in the plan's order, to two .npy files."""
    from tqdm import tqdm

    images = read_images(corpus, set(real_ids))  # only the row groups that hold them
    real = np.zeros((len(real_ids), size, size, 3), dtype=np.uint8)
    for i, image_id in enumerate(tqdm(real_ids, desc="utility inputs (real)", mininterval=10)):
        real[i] = decode_rgb(images[image_id], (size, size), "BILINEAR")
    synth = np.zeros((len(files), size, size, 3), dtype=np.uint8)
    for i, name in enumerate(files):
        synth[i] = decode_rgb((storage.path(set_dir) / name).read_bytes(), (size, size), "BILINEAR")
    for arr, path in ((real, out["real"]), (synth, out["synthetic"])):
        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_write_bytes(buf.getvalue(), path)


def plan_task(cfg: RunConfig, task: Task, weights: str, set_id: str | None = None) -> tuple[TaskPlan, dict]:
    """Draw every seed's arms, decide the trials' settings; returns the plan and what it still
    needs decoded (``None`` when the inputs already exist). ``set_id``: the synthetic set's
    :func:`set_identity`, when the caller has it already."""
    u = cfg.audit_utility
    rows = task_rows(cfg.run_path / "corpus", task)
    set_dir = cfg.run_path / "synthetic" / task.synthetic_set
    synth = synthetic_rows(set_dir, task)
    salt = int(hashlib.sha256(task.name.encode()).hexdigest()[:8], 16)
    draw_seeds = tuple(cfg.seed + k for k in range(u.seeds))
    drawn = {
        k: draw_arms(task, rows["train"]["y"], synth["y"], u.real_full, u.real_half, u.synthetic, [s, salt])
        for k, s in enumerate(draw_seeds)
    }
    used_train = sorted({int(i) for arms in drawn.values() for a in arms.values() for i in a.real})
    used_synth = sorted({int(i) for arms in drawn.values() for a in arms.values() for i in a.synthetic})
    real_ids = [rows["train"]["ids"][i] for i in used_train] + rows["val"]["ids"] + rows["test"]["ids"]
    real_y = np.concatenate([rows["train"]["y"][used_train], rows["val"]["y"], rows["test"]["y"]])
    pos_train = {t: p for p, t in enumerate(used_train)}
    pos_synth = {t: p for p, t in enumerate(used_synth)}
    arms = {
        (name, k): Arm(
            np.array([pos_train[int(i)] for i in a.real], dtype=np.int64),
            np.array([pos_synth[int(i)] for i in a.synthetic], dtype=np.int64),
        )
        for k, by_arm in drawn.items()
        for name, a in by_arm.items()
    }
    n_train, n_val = len(used_train), len(rows["val"]["ids"])
    # the set's content, not only its ids: a set made again by another model keeps its ids
    content = set_id or set_identity(set_dir)
    digest = hashlib.sha256(
        json.dumps([real_ids, [synth["ids"][i] for i in used_synth], u.image_size, content]).encode()
    ).hexdigest()[:16]
    inputs = cfg.run_path / "audit" / "utility" / "inputs"
    paths = {
        "real": storage.uri(inputs / f"{task.name}-{digest}-real.npy"),
        "synthetic": storage.uri(inputs / f"{task.name}-{digest}-synthetic.npy"),
    }
    settings = FitSettings(
        arch=u.arch,
        num_classes=len(task.classes),
        multilabel=task.multilabel,
        epochs=u.epochs,
        batch_size=u.batch_size,
        learning_rate=u.learning_rate,
        weights=weights,
    )
    equal = planned_steps(settings, u.real_full)[1] if u.equal_steps else 0
    plan = TaskPlan(
        task=task,
        real_path=paths["real"],
        synthetic_path=paths["synthetic"],
        real_y=real_y,
        synth_y=synth["y"][used_synth],
        val=np.arange(n_train, n_train + n_val),
        test=np.arange(n_train + n_val, len(real_ids)),
        test_ids=tuple(rows["test"]["ids"]),
        arms=arms,
        draw_seeds=draw_seeds,
        settings=settings,
        equal_steps=equal,
        predictions_dir=storage.uri(cfg.run_path / "audit" / "utility" / "predictions" / task.name),
        checkpoint=u.checkpoint,
        cpus=u.cpus_per_trial,
        fault=os.environ.get(FAULT_ENV, ""),
    )
    todo = None
    if not all(storage.path(p).is_file() for p in paths.values()):
        todo = {
            "corpus": storage.uri(cfg.run_path / "corpus"),
            "real_ids": real_ids,
            "set_dir": storage.uri(cfg.run_path / "synthetic" / task.synthetic_set),
            "files": [synth["files"][i] for i in used_synth],
            "size": u.image_size,
            "out": paths,
        }
    _write_arms(cfg, plan, rows, synth, used_train, used_synth)
    return plan, todo


def _write_arms(cfg: RunConfig, plan: TaskPlan, rows, synth, used_train, used_synth) -> None:
    """``audit/utility/arms/<task>.parquet``: which image each arm of each seed trained on."""
    records = []
    for (arm, k), a in sorted(plan.arms.items()):
        for p in a.real:
            records.append((arm, k, plan.draw_seeds[k], rows["train"]["ids"][used_train[p]], "real"))
        for p in a.synthetic:
            records.append((arm, k, plan.draw_seeds[k], synth["ids"][used_synth[p]], "synthetic"))
    cols = list(zip(*records, strict=True)) if records else [[]] * 5
    table = pa.table(
        {"arm": cols[0], "seed": cols[1], "draw_seed": cols[2], "id": cols[3], "origin": cols[4]},
    )
    out = cfg.run_path / "audit" / "utility" / "arms" / f"{plan.task.name}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_table(table, out)


# --- the Tune trial ---


def utility_trial(config: dict, plans: dict[str, TaskPlan]) -> None:
    """One arm × seed × task: train, report each epoch (with a checkpoint), save test scores."""
    import torch
    from ray import tune

    plan = plans[config["task"]]
    arm, k = config["arm"], int(config["seed"])
    torch.set_num_threads(max(1, int(plan.cpus)))
    real = np.load(storage.cached_file(plan.real_path), mmap_mode="r")  # a node-local copy on object storage
    synth = np.load(storage.cached_file(plan.synthetic_path), mmap_mode="r")
    a = plan.arms[(arm, k)]
    x = np.concatenate([real[a.real], synth[a.synthetic]])
    y = np.concatenate([plan.real_y[a.real], plan.synth_y[a.synthetic]])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = replace(plan.settings, seed=plan.draw_seeds[k], steps=plan.equal_steps, device=device)
    fault_arm, _, fault_epoch = plan.fault.partition("@")

    state, resumed_at = None, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = FitState(**torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False))
        resumed_at = state.epoch

    def on_epoch(st: FitState) -> None:
        metrics = {
            "epoch": st.epoch,
            "steps": st.steps,
            "val_auroc": st.history[-1]["val_auroc"],
            "best_val_auroc": st.best_val_auroc,
            "best_epoch": st.best_epoch,
            "resumed_at_epoch": resumed_at,
        }
        if plan.checkpoint:
            with tempfile.TemporaryDirectory() as d:
                torch.save(asdict(st), Path(d) / "state.pt")
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)
        if fault_arm == arm and (not fault_epoch or (st.epoch == int(fault_epoch) and not resumed_at)):
            raise RuntimeError(f"{FAULT_ENV}: injected failure of {arm} after epoch {st.epoch}")

    from medisyn.audit.classifier import fit

    test = (real[plan.test], plan.real_y[plan.test])
    state = fit((x, y), (real[plan.val], plan.real_y[plan.val]), test, settings, state, on_epoch)
    _write_predictions(plan, arm, k, state, resumed_at)


def _write_predictions(plan: TaskPlan, arm: str, k: int, state: FitState, resumed_at: int) -> None:
    truth = plan.real_y[plan.test]
    table = pa.table(
        {
            "id": list(plan.test_ids),
            "truth": [list(map(bool, r)) for r in truth],
            "scores": [list(map(float, r)) for r in state.test_scores],
        }
    )
    meta = {
        "best_epoch": state.best_epoch,
        "best_val_auroc": state.best_val_auroc,
        "steps": state.steps,
        "epochs": state.epoch,
        "resumed_at_epoch": resumed_at,  # 0: ran start to end; else restarted from that epoch's checkpoint
        "history": state.history,
    }
    table = table.replace_schema_metadata({"medisyn": json.dumps(meta)})
    atomic_write_table(table, storage.path(plan.predictions_dir) / f"{arm}-seed{k}.parquet")


# --- the stage ---


def _fingerprint(cfg: RunConfig, plans: dict[str, TaskPlan], weights_note: str) -> str:
    u = cfg.audit_utility
    keep = {k: v for k, v in asdict(u).items() if k not in RESOURCE_KEYS}
    arms = {
        name: {f"{a}-{k}": [v.real.tolist(), v.synthetic.tolist()] for (a, k), v in p.arms.items()}
        for name, p in plans.items()
    }
    inputs = {name: [p.real_path, p.synthetic_path] for name, p in plans.items()}
    blob = json.dumps([keep, arms, inputs, weights_note], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def trial_progress(total: int):
    """A Tune callback that logs one line per finished trial, instead of Tune's two tables per trial
    (``verbose=0``; 24 trials drew ~500 lines in ``make demo``). Picklable: Tune saves it with the run."""
    from ray import tune

    class TrialProgress(tune.Callback):
        def __init__(self):
            self.done = 0

        def _line(self, trial, what: str) -> None:
            self.done += 1
            c = trial.config
            log.info(
                "audit-utility: trial %d/%d %s (%s, %s, seed %s)",
                self.done,
                total,
                what,
                c["task"],
                c["arm"],
                c["seed"],
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "FAILED")

    return TrialProgress()


def run_trials(cfg: RunConfig, plans: dict[str, TaskPlan], experiment: str) -> None:
    """One Tuner over task × arm × seed; restored when an earlier run of the same plan stopped."""
    from ray import tune

    from medisyn.raytools import gpus_available

    u = cfg.audit_utility
    resources = {"cpu": u.cpus_per_trial}
    if gpus_available():
        resources["gpu"] = u.gpus_per_trial
    trainable = tune.with_resources(tune.with_parameters(utility_trial, plans=plans), resources)
    tune_root = storage.uri(cfg.run_path / "audit" / "utility" / "tune")
    path = f"{tune_root}/{experiment}"
    if tune.Tuner.can_restore(path):
        log.info("audit-utility: resuming %s (finished trials are kept)", path)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={
                "task": tune.grid_search(sorted(plans)),
                "arm": tune.grid_search(list(ARMS)),
                "seed": tune.grid_search(list(range(u.seeds))),
            },
            run_config=tune.RunConfig(
                name=experiment,
                storage_path=tune_root,
                failure_config=tune.FailureConfig(max_failures=u.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=0,
                callbacks=[trial_progress(len(plans) * len(ARMS) * u.seeds)],
            ),
        )
    import pyarrow.fs as pafs

    results = tuner.fit()
    failed = [r for r in results if r.error is not None]
    if failed:
        names = ", ".join(f"{r.config['task']}/{r.config['arm']}/seed{r.config['seed']}" for r in failed)
        raise RuntimeError(
            f"audit-utility: {len(failed)} trial(s) failed: {names}. Rerun the same command to resume them; "
            f"finished trials are kept (first error: {failed[0].error})"
        )
    for r in results:  # finished trials never run again: their checkpoints are dead weight
        for info in r.filesystem.get_file_info(pafs.FileSelector(r.path, allow_not_found=True)):
            if info.base_name.startswith("checkpoint_") and info.type == pafs.FileType.Directory:
                r.filesystem.delete_dir(info.path)


def load_predictions(plan: TaskPlan, seeds: int) -> dict:
    """{(arm, seed): (scores [n, C], meta)} from the trials' files, in the plan's test order."""

    out = {}
    for arm in ARMS:
        for k in range(seeds):
            path = storage.path(plan.predictions_dir) / f"{arm}-seed{k}.parquet"
            table = storage.read_table(path)
            if table.column("id").to_pylist() != list(plan.test_ids):
                raise ValueError(f"{path}: test ids differ from the plan's; rerun audit-utility")
            meta = json.loads(table.schema.metadata[b"medisyn"])
            out[(arm, k)] = (np.array(table.column("scores").to_pylist(), dtype=np.float64), meta)
    return out


def task_statistics(plan: TaskPlan, preds: dict, seeds: int, resamples: int, seed: int, stratified: bool) -> dict:
    """Mean ± sd per arm, the three differences (per seed, seed 0 as the paper's, two-level)
    and per-class DeLong CIs."""
    from medisyn.audit.stats import (
        bootstrap_aurocs,
        delong_diff,
        per_class_auroc,
        percentile_ci,
        two_level_bootstrap_diff,
    )

    y = plan.real_y[plan.test]
    arms = {}
    for arm in ARMS:
        by_seed = np.array([per_class_auroc(y, preds[(arm, k)][0]) for k in range(seeds)])  # [seeds, C]
        aucs = [float(np.nanmean(row)) for row in by_seed]
        per_class = np.nanmean(by_seed, axis=0)
        arms[arm] = {
            "auroc": aucs,
            "mean": float(np.mean(aucs)),
            "sd": float(np.std(aucs, ddof=1)) if seeds > 1 else float("nan"),
            "per_class": dict(zip(plan.task.classes, map(float, per_class), strict=True)),
            "size": plan.arms[(arm, 0)].size,
            "steps": [preds[(arm, k)][1]["steps"] for k in range(seeds)],
            "best_epoch": [preds[(arm, k)][1]["best_epoch"] for k in range(seeds)],
        }
    per_seed = [
        bootstrap_aurocs(y, {arm: preds[(arm, k)][0] for arm in ARMS}, resamples, seed, stratified)
        for k in range(seeds)
    ]
    comparisons = []
    for a, b in COMPARISONS:
        rows = []
        for res in per_seed:
            lo, hi = percentile_ci(res["samples"][a] - res["samples"][b])
            rows.append([res["full"][a] - res["full"][b], lo, hi])
        two = two_level_bootstrap_diff(
            y, [preds[(a, k)][0] for k in range(seeds)], [preds[(b, k)][0] for k in range(seeds)], resamples, seed
        )
        delong = {
            c: delong_diff(y[:, i], preds[(a, 0)][0][:, i], preds[(b, 0)][0][:, i])
            for i, c in enumerate(plan.task.classes)
        }
        comparisons.append(
            {
                "a": a,
                "b": b,
                "per_seed": rows,
                "paper_style": rows[0],
                "two_level": list(two),
                "delong_seed0": delong,
                "dropped_resamples": [res["dropped"] for res in per_seed],
            }
        )
    return {"arms": arms, "comparisons": comparisons, "n_test": len(y), "n_val": len(plan.val)}


def roc_figure(plan: TaskPlan, preds: dict, labels: dict[str, str], out) -> None:
    """ROC curves per class (per label), one line per arm (seed 0): the paper's Figure 5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    y = plan.real_y[plan.test]
    classes = plan.task.classes
    fig, axes = plt.subplots(1, len(classes), figsize=(3.2 * len(classes), 3.4), squeeze=False)
    for i, (c, ax) in enumerate(zip(classes, axes[0], strict=True)):
        ax.plot([0, 1], [0, 1], color="#bbb", lw=0.8)
        if y[:, i].all() or not y[:, i].any():
            ax.set_title(f"{c}\n(one class in test)", fontsize=8)
            continue
        for arm in ARMS:
            fpr, tpr, _ = roc_curve(y[:, i], preds[(arm, 0)][0][:, i])
            ax.plot(fpr, tpr, lw=1.2, label=labels[arm])
        ax.set_title(c, fontsize=8)
        ax.set_xlabel("false positive rate", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("true positive rate", fontsize=7)
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"{plan.task.name}: test ROC by class, seed 0", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), out)


def run(cfg: RunConfig) -> dict:
    import ray

    from medisyn.raytools import ensure_ray

    u = cfg.audit_utility
    tasks = load_tasks(u.tasks_file, u.tasks)
    check_classes(task_needs(tasks), corpus_phrases(cfg.run_path / "corpus"), "the corpus's labels")
    weights, weights_note = resolve_weights(u.arch, u.weights)
    out = cfg.run_path / "audit" / "utility"
    inputs = {  # every set present before any work
        "sets": {n: set_identity(cfg.run_path / "synthetic" / n) for n in sorted({t.synthetic_set for t in tasks})},
        "corpus": corpus_identity(cfg.run_path / "corpus"),
        "tasks": to_dict(tasks),
        "settings": {k: v for k, v in to_dict(u).items() if k not in RESOURCE_KEYS},
        "weights": weights_note,
        "seed": cfg.seed,
    }
    done = finished_with(out / "summary.json", inputs)
    if done is not None:
        print(f"audit-utility: already done for these sets, corpus and settings ({out})")
        return done
    plans, todo = {}, []
    for task in tasks:
        plans[task.name], need = plan_task(cfg, task, weights, inputs["sets"][task.synthetic_set])
        if need:
            todo.append(need)
    ensure_ray()
    if todo:
        remote = ray.remote(num_cpus=1)(write_inputs)
        ray.get([remote.remote(**t) for t in todo])
    experiment = f"tune-{_fingerprint(cfg, plans, weights_note)}"
    run_trials(cfg, plans, experiment)

    labels = {arm: arm_label(arm, u.real_full, u.real_half, u.synthetic) for arm in ARMS}
    summary = {
        "arch": u.arch,
        "weights": weights_note,
        "image_size": u.image_size,
        "epochs": u.epochs,
        "equal_steps": u.equal_steps,
        "seeds": u.seeds,
        "bootstrap_resamples": u.bootstrap_resamples,
        "stratified_bootstrap": u.stratified_bootstrap,
        "experiment": experiment,
        "arm_labels": labels,
        "tasks": {},
        "inputs": inputs,
    }
    tables, csv_rows = [], []
    for name, plan in plans.items():
        preds = load_predictions(plan, u.seeds)
        stats = task_statistics(plan, preds, u.seeds, u.bootstrap_resamples, cfg.seed, u.stratified_bootstrap)
        roc_figure(plan, preds, labels, out / f"{name}-roc.png")
        summary["tasks"][name] = {
            "kind": plan.task.kind,
            "classes": list(plan.task.classes),
            "paper": {k: list(v) for k, v in PAPER_DIFFS.get(name, {}).items()},
            "roc": f"{name}-roc.png",
            **stats,
        }
        for (arm, k), (scores, _) in preds.items():
            tables.append(
                pa.table(
                    {
                        "task": [name] * len(scores),
                        "arm": [arm] * len(scores),
                        "seed": [k] * len(scores),
                        "id": list(plan.test_ids),
                        "truth": [list(map(bool, r)) for r in plan.real_y[plan.test]],
                        "scores": [list(map(float, r)) for r in scores],
                    }
                )
            )
        for arm, v in stats["arms"].items():
            csv_rows.append(f"{name},{arm},{v['size']},{v['mean']:.4f},{v['sd']:.4f},{np.mean(v['steps']):.0f}")
    atomic_write_table(pa.concat_tables(tables), out / "predictions.parquet")
    atomic_write_text(
        "task,arm,train_samples,auroc_mean,auroc_sd,optimizer_steps\n" + "\n".join(csv_rows) + "\n", out / "table.csv"
    )
    atomic_write_text(json.dumps(summary, indent=2), out / "summary.json")
    _print(summary)
    return summary


def _print(summary: dict) -> None:
    labels = summary["arm_labels"]
    print(f"audit-utility: {summary['arch']}, {summary['weights']}; {summary['seeds']} seed(s)")
    for name, t in summary["tasks"].items():
        print(f"  {name} ({t['kind']}, {t['n_test']} test images): test macro AUROC, mean ± sd over seeds")
        for arm, v in t["arms"].items():
            print(f"    {labels[arm]:34s} {v['mean']:.3f} ± {v['sd']:.3f}   steps {int(np.mean(v['steps']))}")
        for c in t["comparisons"]:
            d, lo, hi = c["paper_style"]
            d2, lo2, hi2 = c["two_level"]
            print(
                f"    {c['a']} − {c['b']}: {d:+.3f} ({lo:+.3f}, {hi:+.3f}) seed 0; "
                f"{d2:+.3f} ({lo2:+.3f}, {hi2:+.3f}) over seeds"
            )
