"""Group ids chosen so ingest's hash split stratifies a demo-sized repository, and defect records.

Most entries of the paper's catalog ship no split: ingest puts each group (patient, study, lesion, slide,
video) in train/val/test by a salted hash of its id. Real downloads have thousands of groups; a demo class
has 3-30, and a plain hash left classes with no test image (the utility tasks, the fidelity check and the
reader study need one). So the writers pick, among ids of the form the publisher uses, those the hash puts
where the flat phantoms' stratified split column put their patients. Phantoms sit below ingest and may not
import it: :func:`lands` restates ``medisyn.ingest.split`` (tests/test_phantoms.py checks they agree).
Under another ``ingest.split_salt`` the split is still valid, only no longer stratified.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

SPLIT_SALT = "medisyn"  # ingest.split_salt's default
FRACTIONS = (0.8, 0.1, 0.1)  # ingest.split_fractions' default


def lands(group_id: str) -> str:
    """The split ingest's group hash gives this id under the default salt and fractions."""
    u = int(hashlib.sha256(f"{SPLIT_SALT}\x00{group_id}".encode()).hexdigest()[:13], 16) / float(16**13)
    return "train" if u < FRACTIONS[0] else "val" if u < FRACTIONS[0] + FRACTIONS[1] else "test"


def targets(members: int, val: float = 0.1, test: float = 0.1) -> list[str]:
    """One class's groups in order -> their splits: at least one in val and in test once there are three."""
    n_test = max(1, round(test * members)) if members >= 3 else 0
    n_val = max(1, round(val * members)) if members >= 3 else 0
    return ["train"] * (members - n_val - n_test) + ["val"] * n_val + ["test"] * n_test


def wanted(schedule: list[tuple[int, str, int]], key: Callable, val: float = 0.1, test: float = 0.1) -> dict:
    """{key(p, i): split}, stratified per class over the groups ``key`` names (a patient, an image)."""
    members: dict[str, list] = {}
    for p, cls, i in schedule:
        if key(p, i) not in members.setdefault(cls, []):
            members[cls].append(key(p, i))
    return {g: t for gs in members.values() for g, t in zip(gs, targets(len(gs), val, test), strict=True)}


def pick(ids: Iterable[str], want: str, group: str = "{}") -> str:
    """The first id whose group (``group`` formatted with it: the file's path where the file is the group)
    the hash puts in split ``want``."""
    return next(g for g in ids if lands(group.format(g)) == want)


def record(entry: str, rel: str, kind: str, detail: str, in_labels_csv: bool) -> dict:
    """A planted defect as phantoms.json lists it (the path relative to the output folder)."""
    return {"repo": entry, "path": f"{entry}/{rel}", "kind": kind, "detail": detail, "in_labels_csv": in_labels_csv}
