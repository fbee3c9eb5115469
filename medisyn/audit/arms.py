"""Utility tasks and their four arms: which rows each ResNet trial trains, validates and tests on.

A task (``jobs/configs/utility/*.yaml``) picks corpus rows by specialty, image type and
optionally repository, and names its classes; a row belongs to a multi-class task when its
labels name exactly one class, to a multi-label task when they name at least one. The arms are
drawn per seed from the task's train rows (DESIGN §2, the paper's §4.6, plus a control):

- ``real_full``  (i)   ``real_full`` real images, class-matched to the train split;
- ``real_half``  (ii)  ``real_half`` of those, class-matched to (i);
- ``half_synth`` (iii) (ii) + ``synthetic`` synthetic images, class-matched to (ii);
- ``half_twice`` (iv)  (ii) with every image used twice: as many samples as (iii), no new image,
  so (iii) − (iv) separates "synthetic images" from "more samples".

"Class-matched" means each stratum keeps its share, by largest remainders: multi-class strata
are the classes, multi-label strata the label combinations. The synthetic images follow (ii):
per class, or for a multi-label task whose set was prompted with the corpus's multi-finding
captions (``match_to_corpus``) per label combination; a set of one-label prompts only is
matched to (ii)'s label frequencies instead. Validation and test are every task row of the val
and test splits, the same for every arm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medisyn.audit.stats import strata
from medisyn.configtools import ConfigError, load_yaml_file, named_file
from medisyn.phrases import ClassNeed
from medisyn.records import IMAGE_TYPES, SPECIALTIES

TASK_DIR = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "utility"
TASK_KEYS = ("name", "specialty", "image_type", "sources", "kind", "classes", "synthetic_set")
ARMS = ("real_full", "real_half", "half_synth", "half_twice")
# The paper's two differences and the control's: (first arm, second arm).
COMPARISONS = (("real_full", "real_half"), ("real_full", "half_synth"), ("half_synth", "half_twice"))


@dataclass(frozen=True)
class Task:
    name: str
    specialty: str
    image_type: str
    kind: Literal["multiclass", "multilabel"]
    classes: tuple[str, ...]
    synthetic_set: str
    sources: tuple[str, ...] = ()

    @property
    def multilabel(self) -> bool:
        return self.kind == "multilabel"

    def truth(self, labels) -> np.ndarray | None:
        """A row's labels -> its [C] boolean truth, or None when the row is not in the task."""
        y = np.array([c in labels for c in self.classes])
        count = int(y.sum())
        return y if (count >= 1 if self.multilabel else count == 1) else None


@dataclass(frozen=True)
class Arm:
    """Positions into the task's train rows and synthetic rows (repeats allowed: half_twice)."""

    real: np.ndarray
    synthetic: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def size(self) -> int:
        return len(self.real) + len(self.synthetic)


def load_tasks(tasks_file: str, names: tuple[str, ...] = ()) -> list[Task]:
    """The tasks of a file (by name under ``jobs/configs/utility/`` or a path), checked whole."""
    path = named_file(tasks_file, TASK_DIR, "audit_utility.tasks_file")
    data = load_yaml_file(path, "audit_utility.tasks_file") or {}
    raw = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: expected a mapping with a non-empty list under 'tasks'")
    tasks = [_task(t, f"{path.name}: tasks[{i}]") for i, t in enumerate(raw)]
    seen = [t.name for t in tasks]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"{path.name}: task names repeat: {', '.join(seen)}")
    unknown = sorted(set(names) - set(seen))
    if unknown:
        raise ConfigError(f"audit_utility.tasks: unknown task {unknown[0]!r}; {path.name} has {', '.join(seen)}")
    return [t for t in tasks if not names or t.name in names]


def task_needs(tasks: list[Task]) -> list[ClassNeed]:
    """Every task class, to check against the corpus's phrases before any trial (:mod:`medisyn.phrases`)."""
    return [
        ClassNeed(c, f"utility task {t.name!r}", t.specialty, t.image_type, t.sources) for t in tasks for c in t.classes
    ]


def _task(raw, where: str) -> Task:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    unknown = sorted(set(raw) - set(TASK_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(TASK_KEYS)}")
    missing = [k for k in ("name", "specialty", "image_type", "kind", "classes", "synthetic_set") if not raw.get(k)]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    name = str(raw["name"])
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"{where}: task name {name!r} must be letters, digits, '-' or '_' (it names folders)")
    if raw["specialty"] not in SPECIALTIES:
        raise ConfigError(f"{where} ({name}): unknown specialty {raw['specialty']!r}; expected one of {SPECIALTIES}")
    if raw["image_type"] not in IMAGE_TYPES:
        raise ConfigError(f"{where} ({name}): unknown image_type {raw['image_type']!r}; expected one of {IMAGE_TYPES}")
    if raw["kind"] not in ("multiclass", "multilabel"):
        raise ConfigError(f"{where} ({name}): kind must be multiclass or multilabel, got {raw['kind']!r}")
    classes = raw["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(f"{where} ({name}): classes must list at least two distinct labels")
    sources = raw.get("sources") or []
    if not isinstance(sources, list):
        raise ConfigError(f"{where} ({name}): sources must be a list of repository names")
    return Task(
        name,
        raw["specialty"],
        raw["image_type"],
        raw["kind"],
        tuple(str(c) for c in classes),
        str(raw["synthetic_set"]),
        tuple(str(s) for s in sources),
    )


def allocate(total: int, weights) -> np.ndarray:
    """Split ``total`` in proportion to ``weights`` by largest remainders (the total stays exact)."""
    weights = np.asarray(weights, dtype=np.float64)
    if total == 0 or weights.sum() == 0:
        return np.zeros(len(weights), dtype=np.int64)
    raw = total * weights / weights.sum()
    counts = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts


def _matched_draw(pool: np.ndarray, pool_strata: np.ndarray, n: int, rng) -> np.ndarray:
    """``n`` of ``pool`` without replacement, each stratum keeping its share; sorted."""
    keys = np.unique(pool_strata)
    counts = allocate(n, [np.sum(pool_strata == k) for k in keys])
    picked = [rng.choice(pool[pool_strata == k], c, replace=False) for k, c in zip(keys, counts, strict=True)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _combination(y: np.ndarray) -> np.ndarray:
    """Each row's label combination as one integer (bit c set: class c)."""
    return y.astype(np.int64) @ (1 << np.arange(y.shape[1], dtype=np.int64))


def _synthetic_draw(task: Task, half_y: np.ndarray, synth_y: np.ndarray, n: int, rng) -> np.ndarray:
    """``n`` synthetic rows class-matched to (ii). A multi-label set with multi-finding images is
    drawn per label combination in (ii)'s shares (combinations the set lacks give their share to
    the others: a rare one may round to no prompt); otherwise one-label images per class, in
    proportion to (ii)'s class (label) counts."""
    single = synth_y.sum(axis=1) == 1
    if task.multilabel and (~single).any():
        have_k, half_k = _combination(synth_y), _combination(half_y)
        combos = np.unique(half_k)
        pools = [np.flatnonzero(have_k == k) for k in combos]
        want = allocate(n, [np.sum(half_k == k) if len(p) else 0 for k, p in zip(combos, pools, strict=True)])
        if want.sum() < n:
            raise ConfigError(
                f"audit-utility: task {task.name!r}: no image of set {task.synthetic_set!r} has a label combination "
                "of the real train images; generate it with match_corpus: true"
            )
    else:
        combos = 1 << np.arange(len(task.classes))
        pools = [np.flatnonzero(synth_y[:, c] & single) for c in range(len(task.classes))]
        want = allocate(n, half_y.sum(axis=0))
    picked = []
    for combo, pool, k in zip(combos, pools, want, strict=True):
        if len(pool) < k:
            names = " + ".join(c for i, c in enumerate(task.classes) if combo >> i & 1)
            raise ConfigError(
                f"audit-utility: task {task.name!r} needs {k} synthetic images of {names!r} from set "
                f"{task.synthetic_set!r}; it has {len(pool)} (generate more, or lower audit_utility.synthetic)"
            )
        picked.append(rng.choice(pool, k, replace=False))
    return np.sort(np.concatenate(picked))


def draw_arms(
    task: Task, train_y: np.ndarray, synth_y: np.ndarray, real_full: int, real_half: int, synthetic: int, seed: int
) -> dict[str, Arm]:
    """The four arms for one seed. Raises ConfigError when the corpus or the synthetic set is
    too small for the configured sizes, naming the task, the class and the counts."""
    rng = np.random.default_rng(seed)
    train_y, synth_y = np.asarray(train_y, dtype=bool), np.asarray(synth_y, dtype=bool)
    if len(train_y) < real_full:
        raise ConfigError(
            f"audit-utility: task {task.name!r} has {len(train_y)} train images; audit_utility.real_full is {real_full}"
        )
    rows = np.arange(len(train_y))
    full = _matched_draw(rows, strata(train_y), real_full, rng)
    half = _matched_draw(full, strata(train_y[full]), real_half, rng)
    synth = _synthetic_draw(task, train_y[half], synth_y, synthetic, rng)
    return {
        "real_full": Arm(full),
        "real_half": Arm(half),
        "half_synth": Arm(half, synth),
        "half_twice": Arm(np.concatenate([half, half])),
    }


def arm_label(arm: str, real_full: int, real_half: int, synthetic: int) -> str:
    """The arm as the report names it, with its sizes."""
    return {
        "real_full": f"(i) {real_full:,} real",
        "real_half": f"(ii) {real_half:,} real",
        "half_synth": f"(iii) {real_half:,} real + {synthetic:,} synthetic",
        "half_twice": f"(iv) {real_half:,} real x 2",
    }[arm]
