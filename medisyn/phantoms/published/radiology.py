"""The demo's radiology repositories in their publishers' layouts: RSPECT, figshare brain tumour, CBIS-DDSM,
BUSI and CheXpert (issue #35 item 6).

Each writer draws with the flat demo repository's drawing (``medisyn.phantoms.radiology`` / ``xray_us``) at
its per-class count and patient structure, writes the files, label tables and awkward extras the way the
publisher ships them (``jobs/configs/sources/paper.yaml``; ``replicas.py`` has the same layouts in
miniature) and returns what ingesting the folder through the paper catalog gives (``replicas.expected``).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter

import numpy as np

from .. import dicom_io as dio
from .. import draw as D
from ..common import DEFECT_OFFSET, PATIENT_OFFSET, class_schedule, split_patients
from ..formats import write_mat_v73
from ..radiology import ct_patient, mammo_image, mr_image, pituitary_mr_image, write_ct_slice
from ..replicas import (
    CBIS_CALC,
    CBIS_MASS,
    CBIS_PHRASES,
    CHEXPERT_COLUMNS,
    CHEXPERT_PHRASES,
    FIGSHARE_PHRASES,
    RSPECT_COLUMNS,
    Writer,
    expected,
    grey,
    hash_split,
    uid12,
)
from ..xray_us import COMBOS, cxr_image, us_frames
from .splits import pick, record, targets

__all__ = ["rspect", "figshare_brain_tumor", "cbis_ddsm", "busi", "chexpert"]


# ------------------------------------------------------------------------------------------- rspect
def _cap_rank(entry: str, rel: str, seed: int = 0) -> tuple[str, str]:
    """The catalog's cap order (ingest.steps.rank with caps.seed 0): which slices a per_class cap keeps."""
    return hashlib.sha256(f"{seed}\x00{entry}\x00{rel}".encode()).hexdigest(), rel


def rspect(w: Writer, n: int, defects: bool) -> dict:
    """2n CTPA studies as ctpa draws them (4-8 slices, odd studies with a PE); in a PE study the clot shows
    on the inner slices only, the first and last slice are PE-negative (pe_present_on_image is per slice).
    An unlabelled test/ study (two slices) and the sample submission as Kaggle ships them. Positives are the smaller
    class, so ``caps.per_class: min`` keeps every positive (the defects too) and as many negatives."""
    slices = []  # [study, slice, slices, anatomy, PE on this slice, study UID, series UID]
    rows = []
    study = {}  # per class (even studies negative, odd ones PE) a study in every split: chosen UIDs
    for pe in (0, 1):
        members = range(pe, 2 * n, 2)
        for p, want in zip(members, targets(len(members)), strict=True):
            study[p] = pick((uid12(w, "study", p, a) for a in itertools.count()), want)
    for p in range(2 * n):
        a, n_sl, _, pe = ct_patient(w.ctx, p)
        st, se = study[p], uid12(w, "series", p)
        for k in range(n_sl):
            pos = pe and 0 < k < n_sl - 1
            slices.append([p, k, n_sl, a, pos, st, se])
    n_pos = sum(s[4] for s in slices)
    for s in reversed(slices):  # keep positives + 2 planted positives <= negatives (never on a real seed)
        if n_pos + 2 * defects <= len(slices) - n_pos:
            break
        if s[4]:
            s[4], n_pos = False, n_pos - 1
    labelled: list[tuple[str, int, str]] = []  # (rel, label, study)
    for p, k, n_sl, a, pos, st, se in slices:
        sop = uid12(w, "sop", p, k)
        rel = f"train/{st}/{se}/{sop}.dcm"
        write_ct_slice(w.ctx, p, k, n_sl, a, pos, w.ctx.uid("series", p), w.path(rel), w.ctx.rng(p * 100 + k))
        rows.append(_rspect_row(st, se, sop, pos, any(s[0] == p and s[4] for s in slices)))
        labelled.append((rel, int(pos), st))
    records, bad = [], []
    if defects:  # a truncated slice and a header-only slice, both in train.csv: read rejects
        for q, (kind, detail) in enumerate(
            (
                ("truncated_dicom", "valid CT slice cut to half its bytes (PixelData incomplete)"),
                ("dicom_without_pixel_data", "CT slice with a complete header but no PixelData element"),
            )
        ):
            p = 2 * q + 1  # a PE study
            a, n_sl, _, _ = ct_patient(w.ctx, p)
            st, se, sop = study[p], uid12(w, "series", p), uid12(w, "sop", p, n_sl)
            rel = f"train/{st}/{se}/{sop}.dcm"
            path = w.path(rel)
            write_ct_slice(
                w.ctx, p, n_sl // 2, n_sl, a, True, w.ctx.uid("series", p), path, w.ctx.rng(DEFECT_OFFSET + p),
                pixels=kind != "dicom_without_pixel_data",
            )  # fmt: skip
            if kind == "truncated_dicom":
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
            rows.append(_rspect_row(st, se, sop, True, True))
            bad.append((rel, 1, st))
            records.append(record(w.ctx.repo, rel, kind, detail, True))
    w.csv("train.csv", RSPECT_COLUMNS, rows)
    st, se = uid12(w, "study", "test"), uid12(w, "series", "test")
    test = []
    for k in range(2):  # the unlabelled test/ part (only the three UID columns): not listed
        p = 2 * n + 1
        sop = uid12(w, "sop", "test", k)
        a = ct_patient(w.ctx, p)[0]
        write_ct_slice(w.ctx, p, k, 2, a, False, w.ctx.uid("series", p), w.path(f"test/{st}/{se}/{sop}.dcm"), w.rng())
        test.append([st, se, sop])
    w.csv("test.csv", RSPECT_COLUMNS[:3], test)
    w.csv("sample_submission.csv", ["id", "label"], [[f"{st}_negative_exam_for_pe", 0.5]])
    # what the cap keeps: every positive (the smaller class), the first negatives in the catalog's hash order
    listed = labelled + bad
    keep = min(Counter(label for _, label, _ in listed).values())
    negatives = sorted((r for r in listed if r[1] == 0), key=lambda r: _cap_rank(w.ctx.repo, r[0]))[:keep]
    kept = [r for r in listed if r[1] == 1 and r not in bad] + negatives
    phrases = {1: "pulmonary embolism", 0: "no presence of pulmonary embolism"}
    return expected(
        len(kept),
        dict(Counter(phrases[label] for _, label, _ in kept)),
        {"cap per_class": len(listed) - 2 * keep},
        read_rejects=dict(Counter(RSPECT_REASONS[r["kind"]] for r in records)),
        splits=hash_split(len({study for _, _, study in kept}), "study"),
        defects=records,
    )


def _rspect_row(st: str, se: str, sop: str, pos: bool, pe_study: bool) -> list:
    # pe_present_on_image, negative_exam_for_pe, the QA and RV/LV columns, leftsided_pe, ... (exam-level)
    return [st, se, sop, int(pos), int(not pe_study), 0, 0, 0, int(pe_study), 0, int(pe_study), 0, 0, 0, 0, 0, 0]


RSPECT_REASONS = {"truncated_dicom": "truncated pixel data", "dicom_without_pixel_data": "no pixel data"}


# ----------------------------------------------------------------------------- figshare-brain-tumor
FIGSHARE_PARTS = 766  # files per archive part, as brainTumorDataPublic_1-766, _767-1532, ... ship them


def figshare_brain_tumor(w: Writer, n: int, defects: bool) -> dict:
    """MATLAB v7.3 files 1.mat ... numbered across the classes, in the part folders the archive unzips to,
    plus cvind.mat; numeric PIDs (decoded by the mat reader) group a patient's 2-4 slices."""
    kinds = {1: "meningioma", 2: "glioma", 3: "pituitary"}
    schedule = class_schedule(w.ctx, list(kinds), n)
    order = w.ctx.rng(PATIENT_OFFSET - 4).permutation(len(schedule))  # the archive's numbering mixes classes
    members: dict[int, list[int]] = {}
    for p, label, _ in schedule:
        if p not in members.setdefault(label, []):
            members[label].append(p)
    pid_of = {  # digits, as figshare's PIDs; per class a patient in every split
        p: pick((str(100000 + 1000 * p + a) for a in range(1000)), want)
        for ps in members.values()
        for p, want in zip(ps, targets(len(ps)), strict=True)
    }
    classes, pids = Counter(), set()
    for number, j in enumerate(order, start=1):
        p, label, i = schedule[j]
        prng, rng = w.ctx.patient_rng(p), w.ctx.rng(i)
        arr = pituitary_mr_image(prng, rng) if label == 3 else mr_image(prng, rng, kinds[label])
        image = arr.astype(np.int16)  # the figshare files hold int16 images
        pid = pid_of[p]
        lo = (number - 1) // FIGSHARE_PARTS * FIGSHARE_PARTS + 1
        part = f"brainTumorDataPublic_{lo}-{lo + FIGSHARE_PARTS - 1}"
        write_mat_v73(w.path(f"{part}/{number}.mat"), image, label, pid, _tumour_mask(image))
        classes[FIGSHARE_PHRASES[label]] += 1
        pids.add(pid)
    import h5py

    folds = (np.arange(len(schedule), dtype=np.float64)[None] % 5) + 1
    with h5py.File(w.path("cvind.mat"), "w") as fh:  # the 5-fold indices, also v7.3
        fh.create_dataset("cvind", data=folds)
    return expected(
        sum(classes.values()),
        dict(classes),
        {"cross-validation indices (cvind.mat)": 1},
        splits=hash_split(len(pids), "patient"),
    )


def _tumour_mask(image: np.ndarray) -> np.ndarray:
    """A rough tumorMask (the brightest enhancing region); ingest never reads it."""
    return (image > np.percentile(image, 99)).astype(np.uint8)


# ---------------------------------------------------------------------------------------- cbis-ddsm
CBIS_VIEWS = (("LEFT", "CC"), ("LEFT", "MLO"), ("RIGHT", "CC"), ("RIGHT", "MLO"))


def cbis_ddsm(w: Writer, n: int, defects: bool) -> dict:
    """n full mammograms per pathology (BENIGN, MALIGNANT; CBIS has no normals) as mammography draws them,
    one case folder per image (patient, breast, view), every fourth patient a calcification case; the
    NBIA retriever's descriptive folders; the four case-description CSVs; the official Training/Test
    split by patient (the last ~20% of each class's patients in Test); one ROI crop/mask series."""
    schedule = class_schedule(w.ctx, ["BENIGN", "MALIGNANT"], n, 2, 4)
    patients: dict[str, list[int]] = {}
    for p, cls, _ in schedule:
        if p not in patients.setdefault(cls, []):
            patients[cls].append(p)
    test = {p for members in patients.values() for p in members[len(members) - max(1, round(0.2 * len(members))) :]}
    tables: dict[tuple[str, str], list] = {}
    seen: Counter = Counter()
    splits = Counter()
    roi = 0
    for p, cls, i in schedule:
        prng = w.ctx.patient_rng(p)
        first_right = bool(prng.random() < 0.5)
        side, view = CBIS_VIEWS[(seen[p] + 2 * first_right) % 4]
        seen[p] += 1
        kind = "Calc" if p % 4 == 3 else "Mass"
        part = "Test" if p in test else "Training"
        case = f"{kind}-{part}_P_{p + 1:05d}_{side}_{view}"
        arr = mammo_image(prng, w.ctx.rng(i), cls, side == "RIGHT")
        folder = f"CBIS-DDSM/{case}/{_nbia_date(w, i)}-DDSM-NA-{uid12(w, 'st', i)[:5]}"
        rel = f"{folder}/1.000000-full mammogram images-{uid12(w, 'se', i)[:5]}/1-1.dcm"
        _mg(w, rel, p, i, arr, side, view)
        roi_folder = f"{case}_1/{w.ctx.uid('roi-study', i)}/{w.ctx.uid('roi-series', i)}"
        cells = ["IRREGULAR", "SPICULATED"] if kind == "Mass" else ["PLEOMORPHIC", "CLUSTERED"]
        if cls == "BENIGN":
            cells = ["OVAL", "CIRCUMSCRIBED"] if kind == "Mass" else ["PUNCTATE", "CLUSTERED"]
        tables.setdefault((kind, part), []).append(
            [f"P_{p + 1:05d}", int(prng.integers(1, 5)), side, view, 1, kind.lower(), *cells,
             4 if cls == "MALIGNANT" else 3, cls, int(prng.integers(2, 6)),
             f"{case}/{w.ctx.uid('study', i)}/{w.ctx.uid('series', i)}/000000.dcm",
             f"{roi_folder}/000000.dcm", f"{roi_folder}/000001.dcm\n" if i == 0 else f"{roi_folder}/000001.dcm"]
        )  # fmt: skip
        splits["test" if part == "Test" else "train"] += 1
        if i == 0:  # the abnormality's ROI crop and mask beside the full image: left out by name
            study = f"{_nbia_date(w, i)}-DDSM-NA-{uid12(w, 'roi', i)[:5]}"
            roi_dir = f"CBIS-DDSM/{case}_1/{study}/1.000000-ROI mask images"
            crop = arr[60:124, 20:84].copy()
            mask = np.zeros_like(arr)
            mask[60:124, 20:84] = 4095
            _mg(w, f"{roi_dir}/1-1.dcm", p, DEFECT_OFFSET + 1, crop, side, view)
            _mg(w, f"{roi_dir}/1-2.dcm", p, DEFECT_OFFSET + 2, mask, side, view)
            roi += 2
    for kind in ("Mass", "Calc"):
        for part, name in (("Training", "train"), ("Test", "test")):
            w.csv(
                f"{kind.lower()}_case_description_{name}_set.csv",
                CBIS_MASS if kind == "Mass" else CBIS_CALC,
                tables.get((kind, part), []),
            )
    classes = Counter(CBIS_PHRASES[cls] for _, cls, _ in schedule)
    return expected(len(schedule), dict(classes), {"ROI crop or mask": roi}, splits=dict(splits))


def _nbia_date(w: Writer, i: int) -> str:
    day = int(w.ctx.rng(DEFECT_OFFSET + 100 + i).integers(1, 29))
    return f"07-{day:02d}-2016"


def _mg(w: Writer, rel: str, p: int, i: int, arr: np.ndarray, side: str, view: str) -> None:
    """One MONOCHROME2 full-field mammogram DICOM (CBIS's converted files), PHI canaries in the header."""
    ds = dio.new_dataset(
        w.ctx, p, dio.MAMMO_PRESENTATION, w.ctx.uid("sop", i), "MG", w.ctx.uid("series", p, i),
        ImageType=["DERIVED", "SECONDARY"], ViewPosition=view, ImageLaterality=side[0], BodyPartExamined="BREAST",
        RescaleIntercept=0, RescaleSlope=1,
    )  # fmt: skip
    dio.set_pixels(ds, arr, "MONOCHROME2", bits_stored=12)
    dio.save(ds, w.path(rel))


# --------------------------------------------------------------------------------------------- busi
BUSI_PHRASES = {"normal": "normal tissue", "benign": "a benign lesion", "malignant": "a malignant lesion"}


def busi(w: Writer, n: int, defects: bool) -> dict:
    """n images per class folder, "<class> (<k>).png" (grey saved as RGB, as BUSI's PNGs are) with its
    "_mask.png" beside it (a second "_mask_1.png" for some benign cases); each image its own group."""
    root = "Dataset_BUSI_with_GT"
    masks = 0
    schedule = class_schedule(w.ctx, ["normal", "benign", "malignant"], n, 1, 1)
    number: Counter = Counter()
    for p, cls, i in schedule:
        number[cls] += 1
        stem = f"{root}/{cls}/{cls} ({number[cls]})"
        img = us_frames(w.ctx.patient_rng(p), w.ctx.rng(i), cls)[0]
        w.png(f"{stem}.png", np.repeat(img[..., None], 3, axis=2))
        mask = np.zeros(img.shape, np.uint8)
        if cls != "normal":  # a coarse outline of the darkest (hypoechoic) region: never read by ingest
            mask[D.blur(img.astype(np.float32), 4) < np.percentile(img, 8)] = 255
        w.png(f"{stem}_mask.png", mask)
        masks += 1
        if cls == "benign" and number[cls] % 5 == 2:  # a multifocal case: a second mask
            w.png(f"{stem}_mask_1.png", mask[::-1].copy())
            masks += 1
    return expected(
        len(schedule),
        dict(Counter(BUSI_PHRASES[cls] for _, cls, _ in schedule)),
        {"segmentation mask": masks},
        splits=hash_split(len(schedule), "image"),
    )


# ----------------------------------------------------------------------------------------- chexpert
VALID_FIRST = 64541  # valid/'s patient numbers follow train/'s


def chexpert(w: Writer, n: int, defects: bool) -> dict:
    """chest-xray's AP frontals (its label combinations, 1-3 studies per patient; patient numbers chosen
    for its 60/20/20 patient split) as CheXpert-v1.0-small ships them: 8-bit JPEGs under train/ and valid/
    (every tenth patient) with train.csv/valid.csv; unstated findings blank or 0.0 and now and then
    uncertain (-1.0, read as negative) in train; plus views the filters leave out (a lateral beside every
    eighth study, a PA frontal for every fifteenth patient)."""
    top = "CheXpert-v1.0-small"
    n_img = int(np.ceil(n * len(COMBOS) / 4))
    sizes = split_patients(n_img, w.ctx.rng(PATIENT_OFFSET - 2), 1, 3)
    tables: dict[str, list] = {"train": [], "valid": []}
    classes, left = Counter(), Counter()
    groups, i = set(), 0
    last = {"train": 0, "valid": VALID_FIRST - 1}
    for p, size in enumerate(sizes):
        prng = w.ctx.patient_rng(p)
        sex, age = ("Female" if prng.random() < 0.5 else "Male"), int(prng.integers(25, 90))
        sub = "valid" if p % 10 == 9 else "train"
        want = ("train", "train", "train", "val", "test")[p % 5]  # 60/20/20 of the patients, as chest-xray
        number = last[sub] = int(pick((f"{k:05d}" for k in itertools.count(last[sub] + 1)), want))
        for s in range(size):
            combo = COMBOS[i % len(COMBOS)]
            study = f"{top}/{sub}/patient{number:05d}/study{s + 1}"
            views = [("view1_frontal", "Frontal", "PA" if p % 15 == 14 else "AP")]
            if i % 8 == 5:
                views.append(("view2_lateral", "Lateral", ""))
            for view, fl, appa in views:
                rel = f"{study}/{view}.jpg"
                w.jpeg(rel, grey(cxr_image(w.ctx.rng(i if fl == "Frontal" else DEFECT_OFFSET + i), combo)))
                cells = [_chexpert_cell(c, combo, sub, prng) for c in CHEXPERT_COLUMNS[5:]]
                tables[sub].append([rel, sex, age + s, fl, appa, *cells])
                if fl != "Frontal":
                    left["filter: lateral view"] += 1
                elif appa != "AP":
                    left["filter: not an AP view"] += 1
                else:
                    classes.update(CHEXPERT_PHRASES[c] for c in combo)
                    groups.add(number)
            i += 1
    w.csv(f"{top}/train.csv", CHEXPERT_COLUMNS, tables["train"])
    w.csv(f"{top}/valid.csv", CHEXPERT_COLUMNS, tables["valid"])
    corpus = sum(len(t) for t in tables.values()) - sum(left.values())
    return expected(corpus, dict(classes), dict(left), splits=hash_split(len(groups), "patient"))


def _chexpert_cell(column: str, combo: tuple[str, ...], sub: str, prng: np.random.Generator) -> str:
    if column in combo:
        return "1.0"
    if sub == "valid":  # radiologist labels: every column 0.0 or 1.0
        return "0.0"
    if column in CHEXPERT_PHRASES:  # a finding not drawn: negative, blank (unmentioned) or uncertain
        return str(prng.choice(["0.0", "", "", "-1.0"]))
    return ""
