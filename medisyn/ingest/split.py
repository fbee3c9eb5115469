"""Patient ids become salted hashes, and the hash alone decides the split.

Every image of a patient lands in the same split (no patient in two splits), the split is
the same on every node and every re-run, and the raw id never leaves the listing step.
"""

from __future__ import annotations

import hashlib


def patient_hash(patient_id: str, salt: str) -> str:
    """A 32-hex-digit salted SHA-256 of the id: stable, not reversible without the salt."""
    return hashlib.sha256(f"{salt}\x00{patient_id}".encode()).hexdigest()[:32]


def split_for(hashed_patient: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """train/val/test from the hash's leading 52 bits read as a uniform number in [0, 1)."""
    u = int(hashed_patient[:13], 16) / float(16**13)
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"
