"""The demo's photo-like repositories in their publishers' layouts: ISIC 2019, Fitzpatrick17k, Kermany OCT,
EyePACS and Kvasir v2 (``jobs/configs/sources/paper.yaml``; the replicas in ``replicas.py`` write the same
layouts in miniature).

Each function takes a ``replicas.Writer`` for the entry, the images per class and whether to plant the
entry's defects, draws with the flat demo's drawing functions (``dermatology``, ``ophthalmology``,
``gastro``) from the entry's (seed, entry, index) RNGs, and returns what ingesting the folder through the
paper catalog gives (``replicas.expected``). Image ``i`` draws from ``w.ctx.rng(i)``, patient ``p`` from
``w.ctx.patient_rng(p)`` and the defects from ``DEFECT_OFFSET``, so no two draws share an RNG.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from ..common import DEFECT_OFFSET, PATIENT_OFFSET, class_schedule
from ..dermatology import SKIN_TONES, clinical_image, clinical_lesion_image, dermoscopy_image
from ..gastro import kvasir_image
from ..ophthalmology import fundus_image, fundus_proliferative, oct_image
from ..replicas import Writer, expected, hash_split
from .splits import pick, record, wanted

__all__ = ["isic2019", "fitzpatrick17k", "kermany_oct", "eyepacs", "kvasir_v2"]

# Expectations beyond replicas.expected's: ``read_rejects`` {reason: n} of the reader (rejects of stage "read"),
# ``duplicates`` {reason: n} of the dedup stage, its reason before " of <kept ref>" (the ref is salted),
# ``defects`` the planted defects' records (as defects.py's).


def _hex(w: Writer, *parts, n: int = 32) -> str:
    """A stable hex id from the seed and the parts (no patient id reaches a file name through it)."""
    return hashlib.sha256("|".join(map(str, (w.ctx.seed, w.ctx.repo, *parts))).encode()).hexdigest()[:n]


# ----------------------------------------------------------------------------------------- isic2019
ISIC_COLUMNS = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
ISIC_META = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
# the flat demo's diagnosis (its draw) -> the ground truth's column and the catalog's phrase
ISIC_CLASSES = {
    "MEL": ("MEL", "melanoma"),
    "SK": ("BKL", "seborrheic keratosis"),
    "BCC": ("BCC", "basal cell carcinoma"),
    "NV": ("NV", "melanocytic nevi"),
}
ISIC_INPUT = "ISIC_2019_Training_Input"


def isic2019(w: Writer, n: int, defects: bool) -> dict:
    """One-hot ground truth plus the metadata CSV joined on image; a patient's images share a HAM lesion id,
    a patient with one image has a blank one (the image is its own group, as BCN/MSK rows are). Lesion and
    image ids are chosen for the flat isic's 60/20/20 patient split (see splits.py)."""
    schedule = class_schedule(w.ctx, list(ISIC_CLASSES), n, 1, 3)
    sizes = Counter(p for p, _, _ in schedule)
    want = wanted(schedule, lambda p, i: p, 0.2, 0.2)
    truth, meta, lesion_of = [], [], {}
    ids = iter(range(24306, 10**7, 7))

    def row(iid: str, column: str, p: int, lesion: str) -> None:
        truth.append([iid, *("1.0" if c == column else "0.0" for c in ISIC_COLUMNS[1:])])
        prng = w.ctx.patient_rng(p)
        site = ["anterior torso", "lower extremity", "upper extremity", "head/neck", "posterior torso"][p % 5]
        meta.append([iid, int(prng.integers(3, 17)) * 5, site, lesion, ["female", "male"][int(prng.integers(0, 2))]])

    for p, dx, i in schedule:
        if sizes[p] > 1:  # the lesion id is the group
            lesion = lesion_of.get(p) or pick((f"HAM_{1000 * p + a:07d}" for a in range(1000)), want[p])
            lesion_of[p], iid = lesion, f"ISIC_{next(ids):07d}"
        else:  # blank: the file is the group
            lesion, iid = "", pick((f"ISIC_{k:07d}" for k in ids), want[p], f"{ISIC_INPUT}/{{}}.jpg")
        w.jpeg(f"{ISIC_INPUT}/{iid}.jpg", dermoscopy_image(w.ctx.patient_rng(p), w.ctx.rng(i), dx))
        row(iid, ISIC_CLASSES[dx][0], p, lesion)
    records, left, duplicates = [], {}, {}
    if defects:
        p0, dx0, _ = schedule[0]
        src, dup_id = f"{ISIC_INPUT}/{truth[0][0]}.jpg", f"ISIC_{next(ids):07d}"
        dup = f"{ISIC_INPUT}/{dup_id}.jpg"
        w.path(dup).write_bytes(w.ctx.path(src).read_bytes())  # a later id sorts after it: dedup keeps src
        row(dup_id, ISIC_CLASSES[dx0][0], p0, lesion_of.get(p0, ""))
        p1, unk_id = schedule[-1][0], f"ISIC_{next(ids):07d}"
        unk = f"{ISIC_INPUT}/{unk_id}.jpg"
        w.jpeg(unk, dermoscopy_image(w.ctx.patient_rng(p1), w.ctx.rng(DEFECT_OFFSET), "NV"))
        row(unk_id, "UNK", p1, "")
        records = [
            record(w.ctx.repo, dup, "duplicate_image", f"identical bytes to {w.ctx.repo}/{src} (new id and row)", True),
            record(w.ctx.repo, unk, "unknown_label", "only UNK is 1 in the ground truth: no phrase, left out", True),
        ]
        left = {"unmapped label (UNK)": 1}
        duplicates = {"exact duplicate": 1}
    w.csv("ISIC_2019_Training_GroundTruth.csv", ISIC_COLUMNS, truth)
    w.csv("ISIC_2019_Training_Metadata.csv", ISIC_META, meta)
    classes = Counter(ISIC_CLASSES[dx][1] for _, dx, _ in schedule)
    return expected(
        len(schedule),
        dict(classes),
        left,
        splits=hash_split(len(sizes), "lesion"),
        read_rejects={},
        duplicates=duplicates,
        defects=records,
    )


# ----------------------------------------------------------------------------------- fitzpatrick17k
FITZ_COLUMNS = [
    "md5hash",
    "fitzpatrick_scale",
    "fitzpatrick_centaur",
    "label",
    "nine_partition_label",
    "three_partition_label",
    "qc",
    "url",
    "url_alphanum",
]
FITZ_PHRASES = {
    "non-neoplastic": "non-neoplastic skin condition",
    "benign": "benign skin lesion",
    "malignant": "malignant skin lesion",
}
# per three-partition class, the conditions its patients take in turn: (label, nine-partition label, draw)
FITZ_CONDITIONS = {
    "non-neoplastic": [
        ("psoriasis", "inflammatory", "psoriasis"),
        ("eczema", "inflammatory", "eczema"),
        ("acne vulgaris", "inflammatory", "acne"),
    ],
    "benign": [
        ("dermatofibroma", "benign dermal", "benign"),
        ("seborrheic keratosis", "benign epidermal", "benign"),
        ("congenital nevus", "benign melanocyte", "benign"),
    ],
    "malignant": [
        ("melanoma", "malignant melanoma", "malignant"),
        ("basal cell carcinoma", "malignant epidermal", "malignant"),
        ("squamous cell carcinoma", "malignant epidermal", "malignant"),
    ],
}
FITZ_TYPE = {4: 1, 0: 2, 1: 3, 2: 4, 3: 5}  # SKIN_TONES index -> Fitzpatrick type (lightest 1)


def fitzpatrick17k(w: Writer, n: int, defects: bool) -> dict:
    """images/<md5hash>.jpg beside fitzpatrick17k.csv; the class is the three-partition label, the `label`
    column names which drawing (psoriasis, eczema, acne; a benign or a malignant lesion). No patient id:
    each image is its own group, as in the real set. No defects are planted here."""
    rows, classes, first = [], Counter(), {}
    schedule = class_schedule(w.ctx, list(FITZ_PHRASES), n, 2, 3)
    want = wanted(schedule, lambda p, i: i)  # each image is its own group
    for p, three, i in schedule:
        first.setdefault(three, p)
        label, nine, draw = FITZ_CONDITIONS[three][(p - first[three]) % 3]
        prng, rng = w.ctx.patient_rng(p), w.ctx.rng(i)
        art = clinical_image(prng, rng, draw) if three == "non-neoplastic" else clinical_lesion_image(prng, rng, draw)
        md5 = pick((_hex(w, "md5", i, a) for a in range(10**4)), want[i], "images/{}.jpg")
        w.jpeg(f"images/{md5}.jpg", art)
        scale = FITZ_TYPE[int(w.ctx.patient_rng(p).integers(0, len(SKIN_TONES)))]  # the draw's skin tone
        slug = label.replace(" ", "-")
        url = f"https://www.dermaamin.com/site/images/clinical-pic/{slug[0]}/{slug}/{slug}{i}.jpg"
        qc = "1 Diagnostic" if i % 7 == 3 else ""
        alnum = "".join(ch for ch in url if ch.isalnum()) + ".jpg"
        rows.append([md5, scale, min(6, scale + i % 3 // 2), label, nine, three, qc, url, alnum])
        classes[FITZ_PHRASES[three]] += 1
    w.csv("fitzpatrick17k.csv", FITZ_COLUMNS, rows)
    corpus = sum(classes.values())
    splits = hash_split(corpus, "image")
    return expected(corpus, dict(classes), {}, splits=splits, read_rejects={}, duplicates={}, defects=[])


# -------------------------------------------------------------------------------------- kermany-oct
OCT_PHRASES = {
    "NORMAL": "normal findings",
    "DRUSEN": "drusen",
    "CNV": "choroidal neovascularization",
    "DME": "diabetic macular edema",
}


def _oct_splits(w: Writer, schedule: list[tuple[int, str, int]]) -> dict[int, str]:
    """The flat demo's patient split (80/10/10, every class in every split), as the official folders."""
    from .. import assign_splits
    from ..catalog import BY_NAME

    repo = BY_NAME["oct"]
    rows = [{"path": str(i), "patient_id": p, "label": cls} for p, cls, i in schedule]
    return assign_splits(rows, repo, w.ctx.rng(PATIENT_OFFSET - 3), repo.split_fractions)


def kermany_oct(w: Writer, n: int, defects: bool) -> dict:
    """OCT2017/<split>/<CLASS>/<CLASS>-<patient>-<n>.jpeg, greyscale JPEG; the official folders split by patient."""
    schedule = class_schedule(w.ctx, list(OCT_PHRASES), n, 2, 4)
    split = _oct_splits(w, schedule)
    seen, splits, classes = Counter(), Counter(), Counter()
    for p, cls, i in schedule:
        seen[p] += 1
        pid = w.ctx.patient_id(p)[1:]  # digits only, as Kermany's file names carry
        w.jpeg(
            f"OCT2017/{split[p]}/{cls}/{cls}-{pid}-{seen[p]}.jpeg",
            oct_image(w.ctx.patient_rng(p), w.ctx.rng(i), cls),
        )
        splits[split[p]] += 1
        classes[OCT_PHRASES[cls]] += 1
    records = []
    if defects:
        p, cls, _ = schedule[0]
        rel = f"OCT2017/{split[p]}/{cls}/{cls}-{w.ctx.patient_id(p)[1:]}-{seen[p] + 1}.jpeg"
        w.path(rel).write_bytes(b"")
        records = [record(w.ctx.repo, rel, "empty_file", "zero-byte JPEG in a class folder", False)]
    return expected(
        len(schedule),
        dict(classes),
        {},
        splits=dict(sorted(splits.items())),
        groups=len(split),
        read_rejects={"empty file (0 bytes)": len(records)} if records else {},
        duplicates={},
        defects=records,
    )


# ------------------------------------------------------------------------------------------ eyepacs
# EyePACS level -> the flat demo's drawing; levels 1 and 3 are not written
DR_LEVELS = {
    "0": "no diabetic retinopathy",
    "2": "moderate diabetic retinopathy",
    "4": "proliferative diabetic retinopathy",
}


def _fundus(prng: np.random.Generator, rng: np.random.Generator, level: str) -> np.ndarray:
    if level == "4":
        return fundus_proliferative(prng, rng)
    return fundus_image(prng, rng, "diabetic_retinopathy" if level == "2" else "normal")


def eyepacs(w: Writer, n: int, defects: bool) -> dict:
    """train/<subject>_<left|right>.jpeg and trainLabels.csv (image without extension, level). A subject's
    first image is the eye its drawing shows; a second is the other eye, mirrored (the disc changes side)."""
    schedule = class_schedule(w.ctx, list(DR_LEVELS), n, 1, 2)
    want = wanted(schedule, lambda p, i: p)
    subjects = iter(range(10, 10**6, 3))
    number = {p: pick((str(k) for k in subjects), want[p]) for p in want}  # the subject is the group
    labels, seen = [], Counter()
    for p, level, i in schedule:
        right = w.ctx.patient_rng(p).random() < 0.5  # fundus_image's first per-patient draw: the eye
        art = _fundus(w.ctx.patient_rng(p), w.ctx.rng(i), level)
        if seen[p]:
            right, art = not right, np.ascontiguousarray(art[:, ::-1])
        seen[p] += 1
        name = f"{number[p]}_{'right' if right else 'left'}"
        w.jpeg(f"train/{name}.jpeg", art)
        labels.append([name, int(level)])
    w.csv("trainLabels.csv", ["image", "level"], sorted(labels, key=lambda r: (int(r[0].split("_")[0]), r[0])))
    classes = Counter(DR_LEVELS[level] for _, level, _ in schedule)
    splits = hash_split(len(seen), "patient")
    return expected(len(schedule), dict(classes), {}, splits=splits, read_rejects={}, duplicates={}, defects=[])


# ---------------------------------------------------------------------------------------- kvasir-v2
KVASIR_PHRASES = {
    "polyps": "polyps",
    "esophagitis": "esophagitis",
    "ulcerative-colitis": "ulcerative colitis",
    "dyed-lifted-polyps": "dyed and lifted polyps",
}


def _uuid(w: Writer, *parts) -> str:
    h = _hex(w, "uuid", *parts)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) % 4]}{h[17:20]}-{h[20:32]}"


def kvasir_v2(w: Writer, n: int, defects: bool) -> dict:
    """kvasir-dataset-v2/<class>/<uuid>.jpg: the folder is the label; no patient id, so each image is its
    own group. The other four class folders of the real archive are not written (the demo draws none)."""
    schedule = class_schedule(w.ctx, list(KVASIR_PHRASES), n, 1, 3)
    want = wanted(schedule, lambda p, i: i)  # each image is its own group
    for p, cls, i in schedule:
        rel = pick((f"kvasir-dataset-v2/{cls}/{_uuid(w, i, a)}.jpg" for a in range(10**4)), want[i])
        w.jpeg(rel, kvasir_image(w.ctx.patient_rng(p), w.ctx.rng(i), cls))
    records = []
    if defects:
        cls = schedule[0][1]
        rel = f"kvasir-dataset-v2/{cls}/{_uuid(w, 'truncated')}.jpg"
        w.jpeg(rel, kvasir_image(w.ctx.patient_rng(0), w.ctx.rng(DEFECT_OFFSET), cls))
        data = w.ctx.path(rel).read_bytes()
        w.ctx.path(rel).write_bytes(data[: len(data) // 2])
        records = [record(w.ctx.repo, rel, "truncated_jpeg", "a JPEG cut to half its bytes", False)]
    classes = Counter(KVASIR_PHRASES[cls] for _, cls, _ in schedule)
    corpus = len(schedule)
    return expected(
        corpus,
        dict(classes),
        {},
        splits=hash_split(corpus, "image"),
        read_rejects={"unreadable or truncated image (OSError)": len(records)} if records else {},
        duplicates={},
        defects=records,
    )
