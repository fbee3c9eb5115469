"""Miniature replicas of the paper's public source repositories, in their real on-disk layouts.

The demo phantoms are cleaner than real downloads (exact paths, patient ids and splits in every
CSV). A replica instead copies what a user's unpacked archive looks like (../shared/SOURCES.md
via docs/DESIGN.md): the publisher's folder and file names, label files with their headers
verbatim, their encodings and their awkward rows (uncertain and blank CheXpert labels, a lateral
view, ids without extensions, patient ids only in file names, labels only in folder names, a
second CSV to join, unlabelled images, masks, macOS metadata), with phantom pixels from this
package's drawing and DICOM helpers. A few files per entry, so the whole set writes in seconds.

    from medisyn.phantoms.replicas import generate_replicas
    info = generate_replicas("data/replicas", seed=0)

writes OUT/<entry>/... for every entry of SUPPORTED and OUT/replicas.json: per entry the files
written and what ingest through the shipped catalog (jobs/configs/sources/paper.yaml) must give
(``expect``: corpus, per-phrase counts, left_out by reason, rejects, split counts) and the
catalog rules those numbers rest on (``assumes``). ``break_replica`` makes one entry wrong the
way a user's download can be (a renamed column, a missing folder, a renamed label file).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from . import dicom_io as dio
from . import draw as D
from .common import GenContext, save_jpeg, save_png
from .dermatology import clinical_image, dermoscopy_image
from .formats import write_asap, write_mat_v5, write_mat_v73, write_nifti, write_test_video
from .gastro import kvasir_image
from .ophthalmology import fundus_image, oct_image
from .radiology import ct_anatomy, mammo_image, write_ct_slice
from .xray_us import cxr_image, us_frames

SUPPORTED = (
    "rspect",
    "chexpert",
    "cbis-ddsm",
    "vindr-mammo",
    "busi",
    "hyperkvasir",
    "kvasir-v2",
    "kermany-oct",
    "eyepacs",
    "aptos2019",
    "isic2019",
    "fitzpatrick17k",
    "ddi",
    "figshare-brain-tumor",
    "cholec80",
    "sar-rarp50",
    "camelyon16",
    "pcam",
    "msd-brain-tumour",
)
MARKER_FILE = ".medisyn-replicas"  # a re-run replaces only a folder it wrote itself
BREAKS = ("header", "folder", "file")

__all__ = [
    "Writer",
    "expected",
    "SUPPORTED",
    "BREAKS",
    "BREAKS_WITHOUT_ERROR",
    "generate_replicas",
    "break_replica",
    "run_cli",
]


class Writer:
    """Writes one entry's files under OUT/<entry> and records their relative paths in order."""

    def __init__(self, out: Path, entry: str, seed: int):
        self.ctx = GenContext(seed, entry, out / entry)
        self.files: list[str] = []
        self._i = 0

    def rng(self) -> np.random.Generator:
        self._i += 1
        return self.ctx.rng(self._i)

    def path(self, rel: str) -> Path:
        self.files.append(rel)
        return self.ctx.path(rel)

    def jpeg(self, rel: str, arr: np.ndarray) -> None:
        save_jpeg(arr, self.path(rel))

    def png(self, rel: str, arr: np.ndarray) -> None:
        save_png(arr, self.path(rel))

    def text(self, rel: str, text: str, encoding: str = "utf-8") -> None:
        self.path(rel).write_bytes(text.encode(encoding))

    def csv(self, rel: str, header: list[str] | None, rows: list[list], delimiter: str = ","):
        buf = io.StringIO()
        w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
        if header is not None:
            w.writerow(header)
        w.writerows(rows)
        self.text(rel, buf.getvalue())


def grey(arr16: np.ndarray) -> np.ndarray:
    """A 16-bit phantom as the 8-bit grey a publisher's JPEG/PNG holds."""
    return D.to_u8(arr16.astype(np.float32) / max(float(arr16.max()), 1.0) * 255)


def expected(corpus: int, classes: dict, left_out: dict | None = None, rejects: int = 0, splits=None, **extra):
    return {
        "corpus": corpus,
        "classes": dict(sorted(classes.items())),
        "left_out": dict(sorted((left_out or {}).items())),
        "rejects": rejects,
        "splits": splits,
        **extra,
    }


def hash_split(groups: int, kind: str) -> dict:
    """No official split: ingest's salted group hash decides (80/10/10); only the group count is fixed."""
    return {"by": f"{kind} hash (ingest.split_fractions)", "groups": groups}


# ------------------------------------------------------------------------------------------- rspect
RSPECT_COLUMNS = [
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "pe_present_on_image",
    "negative_exam_for_pe",
    "qa_motion",
    "qa_contrast",
    "flow_artifact",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
    "leftsided_pe",
    "chronic_pe",
    "true_filling_defect_not_pe",
    "rightsided_pe",
    "acute_and_chronic_pe",
    "central_pe",
    "indeterminate",
]


def uid12(w: Writer, *parts) -> str:
    """An anonymised 12-hex-digit UID as RSPECT's folders and files carry."""
    import hashlib

    return hashlib.sha256("|".join(map(str, (w.ctx.seed, *parts))).encode()).hexdigest()[:12]


def _rspect(w: Writer) -> dict:
    # per study: slices, PE-positive slice indices; study 3 is a negative exam
    studies = [(4, {1, 2}), (4, {2}), (4, set())]
    rows = []
    for p, (n_sl, pos) in enumerate(studies):
        a = ct_anatomy(w.ctx.patient_rng(p))
        st, se = uid12(w, "study", p), uid12(w, "series", p)
        for k in range(n_sl):
            sop = uid12(w, "sop", p, k)
            write_ct_slice(
                w.ctx, p, k, n_sl, a, k in pos, w.ctx.uid("series", p), w.path(f"train/{st}/{se}/{sop}.dcm"), w.rng()
            )
            neg_exam = int(not pos)
            rows.append(
                [st, se, sop, int(k in pos), neg_exam, 0, 0, 0, int(bool(pos)), 0, int(bool(pos)), 0, 0, 0, 0, 0, 0]
            )
    w.csv("train.csv", RSPECT_COLUMNS, rows)
    st, se = uid12(w, "study", 9), uid12(w, "series", 9)
    test = []
    for k in range(2):  # unlabelled test studies: only the three UID columns
        sop = uid12(w, "sop", 9, k)
        write_ct_slice(
            w.ctx,
            9,
            k,
            2,
            ct_anatomy(w.ctx.patient_rng(9)),
            False,
            w.ctx.uid("series", 9),
            w.path(f"test/{st}/{se}/{sop}.dcm"),
            w.rng(),
        )
        test.append([st, se, sop])
    w.csv("test.csv", RSPECT_COLUMNS[:3], test)
    w.csv("sample_submission.csv", ["id", "label"], [[f"{st}_negative_exam_for_pe", 0.5]])
    positives = sum(len(p) for _, p in studies)  # 3 of 12 slices; cap per_class min keeps 3 + 3
    return expected(
        2 * positives,
        {"pulmonary embolism": positives, "no presence of pulmonary embolism": positives},
        {"cap per_class": 12 - 2 * positives},
        splits=hash_split(3, "study"),
    )


# ----------------------------------------------------------------------------------------- chexpert
CHEXPERT_COLUMNS = [
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly",
    "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
    "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
]  # fmt: skip
CHEXPERT_PHRASES = {
    "Lung Opacity": "lung opacity",
    "Pleural Effusion": "pleural effusion",
    "Cardiomegaly": "cardiomegaly",
    "Edema": "edema",
}


def _chexpert(w: Writer) -> dict:
    top = "CheXpert-v1.0-small"
    # (split folder, patient, study, view, sex, age, Frontal/Lateral, AP/PA, {column: value})
    rows = [
        ("train", 1, 1, "1_frontal", "Female", 68, "Frontal", "AP", {"Lung Opacity": "1.0", "Pleural Effusion": "0.0"}),
        ("train", 1, 1, "2_lateral", "Female", 68, "Lateral", "", {"Lung Opacity": "1.0"}),
        ("train", 2, 1, "1_frontal", "Female", 87, "Frontal", "AP", {"Cardiomegaly": "1.0", "Edema": "-1.0"}),
        ("train", 2, 2, "1_frontal", "Female", 87, "Frontal", "AP", {"Pleural Effusion": "1.0", "Edema": "1.0"}),
        ("train", 3, 1, "1_frontal", "Male", 45, "Frontal", "PA", {"Edema": "1.0"}),
        ("train", 3, 2, "1_frontal", "Male", 46, "Frontal", "AP", {"No Finding": "1.0"}),
        (
            "train",
            4,
            1,
            "1_frontal",
            "Unknown",
            0,
            "Frontal",
            "AP",
            {"Lung Opacity": "-1.0", "Pleural Effusion": "1.0"},
        ),
        ("train", 5, 1, "1_frontal", "Male", 71, "Frontal", "AP", {"Edema": "1.0", "Cardiomegaly": "1.0"}),
        ("train", 6, 1, "1_frontal", "Female", 59, "Frontal", "AP", {"Lung Opacity": "1.0", "Support Devices": "1.0"}),
        ("train", 7, 1, "1_frontal", "Male", 33, "Frontal", "AP", {"Cardiomegaly": "-1.0"}),
        ("valid", 64541, 1, "1_frontal", "Male", 73, "Frontal", "AP", {"Lung Opacity": "1.0", "Edema": "0.0"}),
        ("valid", 64542, 1, "1_frontal", "Female", 70, "Frontal", "AP", {"Edema": "1.0", "Cardiomegaly": "0.0"}),
    ]
    tables: dict[str, list] = {"train": [], "valid": []}
    classes: Counter = Counter()
    patients: set[int] = set()
    left = Counter()
    for sub, p, s, view, sex, age, fl, appa, labels in rows:
        rel = f"{top}/{sub}/patient{p:05d}/study{s}/view{view}.jpg"
        found = tuple(c for c, v in labels.items() if c in CHEXPERT_PHRASES and v == "1.0")
        w.jpeg(rel, grey(cxr_image(w.rng(), tuple(c for c in found if c != "Support Devices"))))
        cells = [labels.get(c, "") for c in CHEXPERT_COLUMNS[5:]]
        if sub == "valid":  # radiologist labels: every column 0.0 or 1.0
            cells = [v or "0.0" for v in cells]
        tables[sub].append([rel, sex, age, fl, appa, *cells])
        if fl != "Frontal":
            left["filter: lateral view"] += 1
        elif appa != "AP":
            left["filter: not an AP view"] += 1
        elif not found:
            left["no mapped finding"] += 1
        else:
            classes.update(CHEXPERT_PHRASES[c] for c in found)
            patients.add(p)
    w.csv(f"{top}/train.csv", CHEXPERT_COLUMNS, tables["train"])
    w.csv(f"{top}/valid.csv", CHEXPERT_COLUMNS, tables["valid"])
    corpus = len(rows) - sum(left.values())
    return expected(corpus, dict(classes), dict(left), splits=hash_split(len(patients), "patient"))


# ---------------------------------------------------------------------------------------- cbis-ddsm
CBIS_MASS = (
    "patient_id,breast_density,left or right breast,image view,abnormality id,abnormality type,mass shape,"
    "mass margins,assessment,pathology,subtlety,image file path,cropped image file path,ROI mask file path"
).split(",")
CBIS_CALC = (
    "patient_id,breast density,left or right breast,image view,abnormality id,abnormality type,calc type,"
    "calc distribution,assessment,pathology,subtlety,image file path,cropped image file path,ROI mask file path"
).split(",")
CBIS_PHRASES = {"MALIGNANT": "malignant", "BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign"}


def _mg_dicom(w: Writer, rel: str, p: int, cls: str, right: bool, mono1: bool = False, **attrs) -> None:
    prng = w.ctx.patient_rng(p)
    arr = mammo_image(prng, w.rng(), cls, right)
    if mono1:
        arr = (4095 - arr).astype(np.uint16)
    i = len(w.files)
    ds = dio.new_dataset(
        w.ctx, p, dio.MAMMO_PRESENTATION, w.ctx.uid("sop", i), "MG", w.ctx.uid("series", i),
        ImageLaterality="R" if right else "L", BodyPartExamined="BREAST", RescaleIntercept=0, RescaleSlope=1,
        **attrs,
    )  # fmt: skip
    dio.set_pixels(ds, arr, "MONOCHROME1" if mono1 else "MONOCHROME2", bits_stored=12)
    dio.save(ds, w.path(rel))


def _cbis(w: Writer) -> dict:
    # (kind, Training|Test, patient, side, view, [(abnormality id, pathology)])
    cases = [
        ("Mass", "Training", 1, "LEFT", "CC", [(1, "MALIGNANT")]),
        ("Mass", "Training", 1, "LEFT", "MLO", [(1, "MALIGNANT")]),
        ("Mass", "Training", 4, "RIGHT", "CC", [(1, "BENIGN")]),
        ("Calc", "Training", 5, "RIGHT", "CC", [(1, "BENIGN_WITHOUT_CALLBACK"), (2, "BENIGN_WITHOUT_CALLBACK")]),
        ("Calc", "Training", 8, "LEFT", "MLO", [(1, "MALIGNANT")]),
        ("Mass", "Test", 16, "LEFT", "CC", [(1, "MALIGNANT")]),
        ("Calc", "Test", 38, "RIGHT", "MLO", [(1, "BENIGN")]),
    ]
    tables: dict[tuple, list] = {}
    classes, splits = Counter(), Counter()
    for n, (kind, part, p, side, view, abns) in enumerate(cases):
        case = f"{kind}-{part}_P_{p:05d}_{side}_{view}"
        st, se = w.ctx.uid("study", n), w.ctx.uid("series", n)
        folder = f"CBIS-DDSM/{case}/07-20-2016-DDSM-NA-{74994 + n * 131}/1.000000-full mammogram images-{24515 + n}"
        _mg_dicom(w, f"{folder}/1-1.dcm", p, "NORMAL" if abns[0][1] != "MALIGNANT" else "MALIGNANT", side == "RIGHT")
        for a, path in abns:
            roi = f"{case}_{a}/{w.ctx.uid('roi-study', n, a)}/{w.ctx.uid('roi-series', n, a)}"
            mask = f"{roi}/000001.dcm"
            if n == 0:  # the awkward cell: a quoted newline after the mask path
                mask += "\n"
            shape = (
                ["IRREGULAR-ARCHITECTURAL_DISTORTION", "SPICULATED"] if kind == "Mass" else ["PLEOMORPHIC", "CLUSTERED"]
            )
            tables.setdefault((kind, part), []).append(
                [
                    f"P_{p:05d}",
                    3,
                    side,
                    view,
                    a,
                    kind.lower(),
                    *shape,
                    4,
                    path,
                    4,
                    f"{case}/{st}/{se}/000000.dcm",
                    f"{roi}/000000.dcm",
                    mask,
                ]
            )
        if n == 0:  # the abnormality's crop and mask series, written by the retriever beside the full image
            roi_dir = f"CBIS-DDSM/{case}_1/07-21-2016-DDSM-NA-09887/1.000000-ROI mask images-18515"
            _mg_dicom(w, f"{roi_dir}/1-1.dcm", p, "MALIGNANT", False)
            _mg_dicom(w, f"{roi_dir}/1-2.dcm", p, "NORMAL", False)
        classes[CBIS_PHRASES[abns[0][1]]] += 1
        splits["train" if part == "Training" else "test"] += 1
    for (kind, part), rows in tables.items():
        name = f"{kind.lower()}_case_description_{'train' if part == 'Training' else 'test'}_set.csv"
        w.csv(name, CBIS_MASS if kind == "Mass" else CBIS_CALC, rows)
    return expected(len(cases), dict(classes), {"ROI crop or mask": 2}, splits=dict(splits), groups=6)


# -------------------------------------------------------------------------------------- vindr-mammo
VINDR_BREAST = "study_id,series_id,image_id,laterality,view_position,height,width,breast_birads,breast_density,split"
VINDR_FINDING = (
    "study_id,series_id,image_id,laterality,view_position,height,width,breast_birads,breast_density,"
    "finding_categories,finding_birads,xmin,ymin,xmax,ymax,split"
)
VINDR_PHRASES = {
    "Mass": "mass",
    "Suspicious Calcification": "suspicious calcification",
    "Architectural Distortion": "architectural distortion",
    "Focal Asymmetry": "focal asymmetry",
    "Skin Retraction": "skin retraction",
    "No Finding": "no finding",
}


def _hex32(w: Writer, *parts) -> str:
    """VinDr's 32-hex-digit study, series and image ids."""
    return (uid12(w, *parts) + uid12(w, "b", *parts) + uid12(w, "c", *parts))[:32]


def _vindr(w: Writer) -> dict:
    # (study, split, laterality, view, birads, [finding rows: categories])
    images = [
        (0, "training", "L", "CC", 4, [["Mass"]]),
        (0, "training", "L", "MLO", 4, [["Mass", "Skin Retraction"], ["Suspicious Calcification"]]),
        (0, "training", "R", "CC", 1, [["No Finding"]]),
        (0, "training", "R", "MLO", 1, [["No Finding"]]),
        (1, "test", "L", "CC", 3, [["Architectural Distortion"]]),
        (1, "test", "L", "MLO", 3, [["Focal Asymmetry"]]),
        (1, "test", "R", "CC", 1, [["No Finding"]]),
        (1, "test", "R", "MLO", 4, [["Suspicious Calcification"]]),
    ]
    breast, finding = [], []
    classes, splits = Counter(), Counter()
    for n, (s, split, lat, view, birads, rows) in enumerate(images):
        study, series, image = (
            _hex32(w, "study", s),
            _hex32(w, "series", s),
            _hex32(w, "image", n),
        )
        cls = "MALIGNANT" if birads >= 4 else "NORMAL"
        _mg_dicom(w, f"images/{study}/{image}.dicom", s, cls, lat == "R", mono1=n == 1, ViewPosition=view)
        common = [study, series, image, lat, view, 256, 160, f"BI-RADS {birads}", "DENSITY C"]
        breast.append([*common, split])
        for cats in rows:
            box = ["", "", "", ""] if cats == ["No Finding"] else [40.5, 60.25, 90.0, 120.75]
            birad = "" if cats == ["No Finding"] else f"BI-RADS {birads}"
            finding.append([*common, str(cats), birad, *box, split])
        classes.update({VINDR_PHRASES[c] for cats in rows for c in cats})
        splits["train" if split == "training" else "test"] += 1
    w.csv("breast-level_annotations.csv", VINDR_BREAST.split(","), breast)
    w.csv("finding_annotations.csv", VINDR_FINDING.split(","), finding)
    w.csv(
        "metadata.csv",
        ["Series Instance UID", "Patient's Age", "Manufacturer"],
        [[r[1], "053Y", "PHANTOM"] for r in breast[::4]],
    )
    w.text("SHA256SUMS.txt", "".join(f"{'0' * 64}  {f}\n" for f in w.files))
    return expected(len(images), dict(classes), {}, splits=dict(splits), groups=2)


# --------------------------------------------------------------------------------------------- busi
def _busi(w: Writer) -> dict:
    root = "Dataset_BUSI_with_GT"
    counts = {"benign": 3, "malignant": 2, "normal": 2}
    masks = 0
    for cls, n in counts.items():
        for i in range(1, n + 1):
            prng = w.rng()
            img = us_frames(prng, w.rng(), cls)[0]
            w.png(f"{root}/{cls}/{cls} ({i}).png", np.repeat(img[..., None], 3, axis=2))  # grey saved as RGB
            mask = np.zeros(img.shape, np.uint8)
            if cls != "normal":
                mask[60:120, 80:160] = 255
            w.png(f"{root}/{cls}/{cls} ({i})_mask.png", mask)
            masks += 1
            if cls == "benign" and i == 2:  # a multifocal case: a second mask
                w.png(f"{root}/{cls}/{cls} ({i})_mask_1.png", mask[::-1].copy())
                masks += 1
    phrases = {
        "benign": "a benign lesion",
        "malignant": "a malignant lesion",
        "normal": "normal tissue",
    }
    return expected(
        sum(counts.values()),
        {phrases[c]: n for c, n in counts.items()},
        {"segmentation mask": masks},
        splits=hash_split(sum(counts.values()), "image"),
    )


# -------------------------------------------------------------------------------------- hyperkvasir
GI_PHRASES = {
    "polyps": "polyps",
    "dyed-lifted-polyps": "dyed and lifted polyps",
    "esophagitis": "esophagitis",
    "esophagitis-a": "esophagitis",
    "esophagitis-b-d": "esophagitis",
    "ulcerative-colitis": "ulcerative colitis",
}
for _g in ("0-1", "1", "1-2", "2", "2-3", "3"):
    GI_PHRASES[f"ulcerative-colitis-grade-{_g}"] = "ulcerative colitis"
GI_PHRASES |= {  # the catalog's phrases for the findings outside the paper's prompts
    "dyed-resection-margins": "dyed resection margins",
    "cecum": "a normal cecum",
    "normal-cecum": "a normal cecum",
    "pylorus": "a normal pylorus",
    "normal-pylorus": "a normal pylorus",
    "z-line": "a normal Z-line",
    "normal-z-line": "a normal Z-line",
    "bbps-2-3": "good bowel preparation",
}


def _uuid(w: Writer, *parts) -> str:
    h = uid12(w, "uuid", *parts) + uid12(w, "uuid2", *parts) + uid12(w, "uuid3", *parts)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) % 4]}{h[17:20]}-{h[20:32]}"


def _gi_image(w: Writer, finding: str) -> np.ndarray:
    base = {"esophagitis-a": "esophagitis", "esophagitis-b-d": "esophagitis"}.get(finding, finding)
    base = "ulcerative-colitis" if base.startswith("ulcerative-colitis") else base
    return kvasir_image(w.rng(), w.rng(), base)


def _hyperkvasir(w: Writer) -> dict:
    labelled = [
        ("lower-gi-tract", "pathological-findings", "polyps"),
        ("lower-gi-tract", "pathological-findings", "polyps"),
        ("lower-gi-tract", "therapeutic-interventions", "dyed-lifted-polyps"),
        ("upper-gi-tract", "pathological-findings", "esophagitis-a"),
        ("upper-gi-tract", "pathological-findings", "esophagitis-b-d"),
        ("lower-gi-tract", "pathological-findings", "ulcerative-colitis-grade-2"),
        ("lower-gi-tract", "pathological-findings", "ulcerative-colitis-grade-1-2"),
        ("lower-gi-tract", "anatomical-landmarks", "cecum"),
        ("upper-gi-tract", "anatomical-landmarks", "z-line"),
        ("lower-gi-tract", "quality-of-mucosal-views", "bbps-2-3"),
    ]
    rows = []
    classes, left = Counter(), Counter()
    for i, (tract, cat, finding) in enumerate(labelled):
        uid = _uuid(w, i)
        w.jpeg(f"labeled-images/{tract}/{cat}/{finding}/{uid}.jpg", _gi_image(w, finding))
        organ = "Lower GI" if tract.startswith("lower") else "Upper GI"
        rows.append([uid, organ, finding, cat])
        if finding in GI_PHRASES:
            classes[GI_PHRASES[finding]] += 1
        else:
            left["unmapped label (finding)"] += 1
    w.csv("labeled-images/image-labels.csv", ["Video file", "Organ", "Finding", "Classification"], rows)
    for i in range(2):
        w.jpeg(f"unlabeled-images/images/{_uuid(w, 'u', i)}.jpg", _gi_image(w, "normal-cecum"))
    sid = _uuid(w, "seg", 0)
    w.jpeg(f"segmented-images/images/{sid}.jpg", _gi_image(w, "polyps"))
    mask = np.zeros((200, 250, 3), np.uint8)
    mask[50:150, 60:180] = 255
    w.jpeg(f"segmented-images/masks/{sid}.jpg", mask)
    corpus = sum(classes.values())
    return expected(corpus, dict(classes), dict(left), splits=hash_split(corpus, "image"))


# ---------------------------------------------------------------------------------------- kvasir-v2
KVASIR_FOLDERS = (
    "dyed-lifted-polyps",
    "dyed-resection-margins",
    "esophagitis",
    "normal-cecum",
    "normal-pylorus",
    "normal-z-line",
    "polyps",
    "ulcerative-colitis",
)


def _kvasir(w: Writer) -> dict:
    per = {c: 1 for c in KVASIR_FOLDERS} | {"polyps": 2, "esophagitis": 2}
    classes, left = Counter(), Counter()
    for cls, n in per.items():
        for i in range(n):
            w.jpeg(f"kvasir-dataset-v2/{cls}/{_uuid(w, cls, i)}.jpg", _gi_image(w, cls))
            if cls in GI_PHRASES:
                classes[GI_PHRASES[cls]] += 1
            else:
                left["unmapped label (folder)"] += 1
    corpus = sum(classes.values())
    return expected(corpus, dict(classes), dict(left), splits=hash_split(corpus, "image"))


# -------------------------------------------------------------------------------------- kermany-oct
OCT_PHRASES = {
    "CNV": "choroidal neovascularization",
    "DME": "diabetic macular edema",
    "DRUSEN": "drusen",
    "NORMAL": "normal findings",
}


def _kermany(w: Writer) -> dict:
    files = [
        ("train", "CNV", 163081, 1),
        ("train", "CNV", 163081, 2),
        ("train", "DRUSEN", 1001666, 1),
        ("train", "NORMAL", 1001666, 1),  # the same patient under two classes
        ("train", "DME", 2001, 1),
        ("train", "NORMAL", 3002, 1),
        ("train", "DRUSEN", 3003, 4),
        ("test", "CNV", 4001, 1),
        ("test", "DME", 4002, 1),
        ("test", "DRUSEN", 4003, 1),
        ("test", "NORMAL", 4004, 1),
        ("val", "NORMAL", 5001, 1),
    ]
    classes, splits = Counter(), Counter()
    for split, cls, pid, n in files:
        w.jpeg(f"OCT2017/{split}/{cls}/{cls}-{pid}-{n}.jpeg", oct_image(w.ctx.patient_rng(pid), w.rng(), cls))
        classes[OCT_PHRASES[cls]] += 1
        splits[split] += 1
    # an AppleDouble resource fork, as the Kaggle zip ships them: not an image
    w.text(
        "__MACOSX/OCT2017/train/CNV/._CNV-163081-1.jpeg", "\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ", "latin-1"
    )
    return expected(len(files), dict(classes), {"macOS metadata": 1}, splits=dict(splits), groups=10)


# ------------------------------------------------------------------------------------------ eyepacs
DR_PHRASES = {
    "0": "no diabetic retinopathy",
    "1": "mild diabetic retinopathy",
    "2": "moderate diabetic retinopathy",
    "3": "severe diabetic retinopathy",
    "4": "proliferative diabetic retinopathy",
}


def _fundus(w: Writer, level: int, key: int) -> np.ndarray:
    return fundus_image(w.ctx.patient_rng(key), w.rng(), "diabetic_retinopathy" if level else "normal")


def _eyepacs(w: Writer) -> dict:
    levels = {"10_left": 0, "10_right": 0, "13_left": 0, "13_right": 1, "15_left": 1, "15_right": 2}
    levels |= {"16_left": 3, "16_right": 2, "17_left": 4, "17_right": 4}
    for name, lv in levels.items():
        w.jpeg(f"train/{name}.jpeg", _fundus(w, lv, int(name.split("_")[0])))
    w.jpeg("train/99_left.jpeg", _fundus(w, 0, 99))  # an image with no row in trainLabels.csv
    for name in ("1_left", "1_right"):  # unlabelled test images
        w.jpeg(f"test/{name}.jpeg", _fundus(w, 0, 1))
    w.csv("trainLabels.csv", ["image", "level"], [[k, v] for k, v in levels.items()])
    classes = Counter(DR_PHRASES[str(v)] for v in levels.values())
    return expected(
        len(levels),
        dict(classes),
        {"unlabelled (no row in trainLabels.csv)": 1},
        splits=hash_split(5, "patient"),
    )


# ---------------------------------------------------------------------------------------- aptos2019
def _aptos(w: Writer) -> dict:
    diag = [2, 4, 1, 0, 0, 3, 2, 0, 1, 4]
    codes = ["000c1434d8d7", "001639a390f0", "0024cdab0c1e"]  # SOURCES' rows, verbatim ids
    codes += [uid12(w, "aptos", i) for i in range(3, len(diag))]
    rows = []
    for i, (code, d) in enumerate(zip(codes, diag, strict=True)):
        w.png(f"train_images/{code}.png", _fundus(w, d, i))
        rows.append([code, d])
    tests = [uid12(w, "aptos-test", i) for i in range(2)]
    for i, code in enumerate(tests):
        w.png(f"test_images/{code}.png", _fundus(w, 0, 200 + i))
    w.csv("train.csv", ["id_code", "diagnosis"], rows)
    w.csv("test.csv", ["id_code"], [[c] for c in tests])
    w.csv("sample_submission.csv", ["id_code", "diagnosis"], [[c, 0] for c in tests])
    classes = Counter(DR_PHRASES[str(d)] for d in diag)
    return expected(len(diag), dict(classes), {}, splits=hash_split(len(diag), "image"))


# ----------------------------------------------------------------------------------------- isic2019
ISIC_COLUMNS = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
ISIC_PHRASES = {
    "MEL": "melanoma",
    "NV": "melanocytic nevi",
    "BCC": "basal cell carcinoma",
    "BKL": "seborrheic keratosis",
    "AK": "actinic keratosis",
    "DF": "dermatofibroma",
    "VASC": "vascular lesion",
    "SCC": "squamous cell carcinoma",
}


def _isic(w: Writer) -> dict:
    # (id, diagnosis, lesion_id or "")
    images = [
        ("ISIC_0000000", "NV", ""),
        ("ISIC_0000001", "NV", ""),
        ("ISIC_0000002", "MEL", ""),
        ("ISIC_0000022_downsampled", "MEL", ""),
        ("ISIC_0024306", "NV", "HAM_0000550"),
        ("ISIC_0025030", "BKL", "HAM_0000118"),
        ("ISIC_0027419", "BKL", "HAM_0000118"),  # two images of one lesion
        ("ISIC_0028155", "BCC", "HAM_0002867"),
        ("ISIC_0053494", "BCC", ""),
        ("ISIC_0024329", "AK", "HAM_0002965"),
        ("ISIC_0024318", "DF", "HAM_0004006"),
        ("ISIC_0024370", "VASC", "HAM_0001729"),
    ]
    truth, meta = [], []
    dermo = {"MEL": "MEL", "NV": "NV", "BCC": "BCC", "BKL": "SK"}
    for i, (iid, dx, lesion) in enumerate(images):
        w.jpeg(f"ISIC_2019_Training_Input/{iid}.jpg", dermoscopy_image(w.rng(), w.rng(), dermo.get(dx, "NV")))
        truth.append([iid, *("1.0" if c == dx else "0.0" for c in ISIC_COLUMNS[1:])])
        meta.append(
            [iid, 55 if i % 3 else "", ["anterior torso", "head/neck", ""][i % 3], lesion, ["female", "male"][i % 2]]
        )
    w.csv("ISIC_2019_Training_GroundTruth.csv", ISIC_COLUMNS, truth)
    w.csv("ISIC_2019_Training_Metadata.csv", ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"], meta)
    classes, left = Counter(), Counter()
    for _, dx, _ in images:
        if dx in ISIC_PHRASES:
            classes[ISIC_PHRASES[dx]] += 1
        else:
            left[f"unmapped label ({dx})"] += 1
    kept = [(i, lesion) for i, dx, lesion in images if dx in ISIC_PHRASES]
    groups = len({lesion or iid for iid, lesion in kept})  # a blank lesion_id: the image is its own group
    return expected(len(kept), dict(classes), dict(left), splits=hash_split(groups, "lesion"))


# ----------------------------------------------------------------------------------- fitzpatrick17k
FITZ_COLUMNS = (
    "md5hash,fitzpatrick_scale,fitzpatrick_centaur,label,nine_partition_label,three_partition_label,qc,url,url_alphanum"
).split(",")
FITZ_PHRASES = {
    "non-neoplastic": "non-neoplastic skin condition",
    "benign": "benign skin lesion",
    "malignant": "malignant skin lesion",
}


def _fitzpatrick(w: Writer) -> dict:
    # (label, nine, three, qc, image present)
    rows = [
        ("drug induced pigmentary changes", "inflammatory", "non-neoplastic", "", True),
        ("photodermatoses", "inflammatory", "non-neoplastic", "", True),
        ("dermatofibroma", "benign dermal", "benign", "", True),
        ("psoriasis", "inflammatory", "non-neoplastic", "1 Diagnostic", True),
        ("melanoma", "malignant melanoma", "malignant", "", True),
        ("basal cell carcinoma", "malignant epidermal", "malignant", "", True),
        ("seborrheic keratosis", "benign epidermal", "benign", "3 Wrongly labelled", True),
        ("mycosis fungoides", "malignant cutaneous lymphoma", "malignant", "", True),
        ("acne vulgaris", "inflammatory", "non-neoplastic", "", False),  # URL dead: no image on disk
        ("pilar cyst", "benign epidermal", "benign", "", False),
    ]
    out, classes, left = [], Counter(), Counter()
    rejects = 0
    for i, (label, nine, three, qc, present) in enumerate(rows):
        md5 = (uid12(w, "md5", i) * 3)[:32]
        slug = label.replace(" ", "-")
        url = f"https://www.dermaamin.com/site/images/clinical-pic/x/{slug}/{slug}{i}.jpg"
        alnum = "".join(ch for ch in url if ch.isalnum()) + ".jpg"
        out.append(
            [
                md5,
                [3, 1, 2, 4, 5, 6, 2, -1, 3, 2][i],
                [3, 1, 3, 4, 5, 6, 2, 1, 3, 2][i],
                label,
                nine,
                three,
                qc,
                url,
                alnum,
            ]
        )
        if present:
            w.jpeg(
                f"images/{md5}.jpg", clinical_image(w.rng(), w.rng(), "psoriasis" if three == "malignant" else "eczema")
            )
        if qc == "3 Wrongly labelled":
            left["filter: wrongly labelled (qc)"] += 1
        elif not present:
            rejects += 1
        else:
            classes[FITZ_PHRASES[three]] += 1
    w.csv("fitzpatrick17k.csv", FITZ_COLUMNS, out)
    corpus = sum(classes.values())
    return expected(corpus, dict(classes), dict(left), rejects, splits=hash_split(corpus, "image"))


# ---------------------------------------------------------------------------------------------- ddi
DDI_PHRASES = {"True": "malignant skin lesion", "False": "benign skin lesion"}


def _ddi(w: Writer) -> dict:
    rows = [
        (12, True, "melanoma-in-situ"),
        (12, False, "seborrheic-keratosis"),
        (34, False, "verruca-vulgaris"),
        (34, True, "basal-cell-carcinoma"),
        (56, False, "epidermal-cyst"),
        (56, True, "squamous-cell-carcinoma-in-situ"),
        (12, False, "melanocytic-nevi"),
        (56, False, "dermatofibroma"),
    ]
    top = "ddidiversedermatologyimages"
    table = []
    for i, (tone, malig, disease) in enumerate(rows):
        name = f"{i + 1:06d}.png"
        w.png(f"{top}/{name}", clinical_image(w.rng(), w.rng(), "psoriasis" if malig else "eczema"))
        table.append([i, i + 1, name, tone, malig, disease])
    w.csv(f"{top}/ddi_metadata.csv", ["", "DDI_ID", "DDI_file", "skin_tone", "malignant", "disease"], table)
    classes = Counter(DDI_PHRASES[str(m)] for _, m, _ in rows)
    return expected(len(rows), dict(classes), {}, splits=hash_split(len(rows), "image"))


# ------------------------------------------------------------------------------ issue #35: other kinds
# Videos, MATLAB and HDF5 files, slides with lesion outlines and NIfTI volumes, written with the writers the
# #35 readers are tested with (phantoms/formats.py), so a replica is what the readers expect of a real
# download. Each builder computes its `expect` from its own rows, not by running a reader.

LEFT_EVERY = "video.every: annotated frame between samples (every {})"
PAST_END = "annotation past the video's end"
CHOLEC_PHRASES = {
    "Preparation": "preparation",
    "CalotTriangleDissection": "Calot's triangle dissection",
    "ClippingCutting": "clipping and cutting",
    "GallbladderDissection": "gallbladder dissection",
    "GallbladderPackaging": "gallbladder packaging",
    "CleaningCoagulation": "cleaning and coagulation",
    "GallbladderRetraction": "gallbladder retraction",
}
CHOLEC_FPS, CHOLEC_EVERY = 25, 25
TOOLS = ["Grasper", "Bipolar", "Hook", "Scissors", "Clipper", "Irrigator", "SpecimenBag"]


def _video(w: Writer, rel: str, frames: int, fps: float, seed: int) -> None:
    write_test_video(w.path(rel), frames, fps, seed=seed)


def _cholec80(w: Writer) -> dict:
    # (video, frames written, phase runs (phase, first frame), annotated frames): video02's phase file runs
    # two seconds past its end, as a video cut short of its annotation does
    videos = [
        (1, 75, [("Preparation", 0), ("CalotTriangleDissection", 30)], 75),
        (2, 75, [("ClippingCutting", 0), ("GallbladderDissection", 45)], 125),
    ]
    classes, left, past = Counter(), 0, 0
    listed: Counter = Counter()
    for v, n, runs, annotated in videos:
        _video(w, f"cholec80/videos/video{v:02d}.mp4", n, CHOLEC_FPS, seed=100 + v)
        rows = []
        for f in range(annotated):
            phase = [p for p, start in runs if f >= start][-1]
            rows.append([f, phase])
            if f % CHOLEC_EVERY:
                left += 1
                continue
            listed[CHOLEC_PHRASES[phase]] += 1
            if f >= n:
                past += 1
            else:
                classes[CHOLEC_PHRASES[phase]] += 1
        w.csv(f"cholec80/phase_annotations/video{v:02d}-phase.txt", ["Frame", "Phase"], rows, delimiter="\t")
        tools = [[f, *(int((f // 25 + k) % 3 == 0) for k in range(len(TOOLS)))] for f in range(0, n - 25, 25)]
        w.csv(f"cholec80/tool_annotations/video{v:02d}-tool.txt", ["Frame", *TOOLS], tools, delimiter="\t")
        w.text(f"cholec80/videos/video{v:02d}-timestamp.txt", "".join(f"{f}\t00:00:{f // 25:02d}\n" for f in range(n)))
    left_out = {LEFT_EVERY.format(CHOLEC_EVERY): left}
    return expected(
        sum(classes.values()),
        dict(classes),
        left_out,
        splits=hash_split(len(videos), "video"),
        read_rejects={PAST_END: past},
        listing={"items": sum(listed.values()), "classes": dict(sorted(listed.items())), "left_out": left_out},
    )


SAR_PHRASES = {
    "1": "picking up the needle",
    "2": "positioning the needle tip",
    "3": "pushing the needle through the tissue",
    "4": "pulling the needle out of the tissue",
    "5": "tying a knot",
    "6": "cutting the suture",
    "7": "returning the needle",
}
SAR_FPS, SAR_EVERY = 60, 6


def _sar_rarp50(w: Writer) -> dict:
    # (set, folder, action per 10 Hz row, zero-padded frame field): operation 11 in two parts, one in test
    clips = [
        ("train1", "video_11_1", [0, 0, 0, 1, 1, 1, 2, 2, 2, 2], False),
        ("train1", "video_11_2", [3, 3, 3, 3, 3, 4, 4, 4, 4, 4], False),
        ("test", "video_41", [5, 5, 5, 5, 6, 6, 6, 7, 7, 7], True),
    ]
    classes, splits, other = Counter(), Counter(), 0
    for k, (part, folder, actions, padded) in enumerate(clips):
        _video(w, f"{part}/{folder}/video_left.avi", len(actions) * SAR_EVERY, SAR_FPS, seed=200 + k)
        rows = [[f"{i * SAR_EVERY:09d}" if padded else i * SAR_EVERY, a] for i, a in enumerate(actions)]
        w.csv(f"{part}/{folder}/action_discrete.txt", None, rows)
        for a in actions:
            if a == 0:
                other += 1
            else:
                classes[SAR_PHRASES[str(a)]] += 1
                splits["train" if part.startswith("train") else "test"] += 1
    return expected(
        sum(classes.values()), dict(classes), {"unmapped label (action)": other}, splits=dict(splits), groups=2
    )


FIGSHARE_PHRASES = {1: "meningioma", 2: "glioma", 3: "pituitary tumor"}


def _figshare(w: Writer) -> dict:
    from .radiology import mr_image

    part = "brainTumorDataPublic_1-766"
    # (file number, label, PID, format): four v7.3 files, one re-saved as v5, one that is no MATLAB file
    files = [(1, 1, "100360", "7.3"), (2, 1, "100360", "7.3"), (3, 2, "MR029100", "7.3"), (4, 3, "112649", "7.3"),
             (5, 2, "112649", "5"), (6, 2, "95618", "none")]  # fmt: skip
    classes, pids = Counter(), set()
    for n, label, pid, fmt in files:
        rel = f"{part}/{n}.mat"
        if fmt == "none":  # a part that did not download whole: an HTML error page saved under the name
            w.text(rel, "<html><body>Service Unavailable</body></html>\n")
            continue
        cls = {1: "meningioma", 2: "glioma", 3: "pituitary"}[label]
        image = mr_image(w.ctx.patient_rng(n), w.rng(), cls)[:, 16:].astype(np.int16)  # not square: 192 x 176
        mask = np.zeros(image.shape, np.uint8)
        mask[80:100, 70:95] = 1
        (write_mat_v73 if fmt == "7.3" else write_mat_v5)(w.path(rel), image, label, pid, mask)
        if fmt == "5":  # scipy stamps the header with the time of writing: the same seed must give the same bytes
            path = w.ctx.path(rel)
            head = b"MATLAB 5.0 MAT-file, Platform: posix, Created on: Thu Jan  1 00:00:00 1970"
            path.write_bytes(head.ljust(116, b" ") + path.read_bytes()[116:])
        classes[FIGSHARE_PHRASES[label]] += 1
        pids.add(pid)
    import h5py

    with h5py.File(w.path("cvind.mat"), "w") as fh:  # the 5-fold indices, also v7.3
        fh.create_dataset("cvind", data=np.arange(1, 7, dtype=np.float64)[None] % 5 + 1)
    return expected(
        sum(classes.values()),
        dict(classes),
        {"cross-validation indices (cvind.mat)": 1},
        rejects=1,
        splits=hash_split(len(pids), "patient"),
        reject_reasons={"not a MATLAB file": 1},
    )


PCAM_META = ["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"]
PCAM_PHRASES = {"True": "metastasis", "False": "no presence of metastasis"}


def _pcam(w: Writer) -> dict:
    import h5py

    # per split: (centre tumour, any tumour, slide) per patch; slides are split-disjoint
    parts = {
        "train": [(True, True, "camelyon16_train_tumor_009"), (False, True, "camelyon16_train_tumor_009"),
                  (False, False, "camelyon16_train_normal_001"), (True, True, "camelyon16_train_tumor_031"),
                  (False, False, "camelyon16_train_normal_001"), (False, False, "camelyon16_train_tumor_031")],
        "valid": [(True, True, "camelyon16_train_tumor_021"), (False, False, "camelyon16_train_normal_101"),
                  (False, True, "camelyon16_train_tumor_021"), (False, False, "camelyon16_train_normal_101")],
        "test": [(True, True, "camelyon16_test_001"), (False, False, "camelyon16_test_002"),
                 (True, True, "camelyon16_test_001"), (False, False, "camelyon16_test_002")],
    }  # fmt: skip
    classes, splits, slides = Counter(), Counter(), set()
    for name, rows in parts.items():
        x = np.stack([_he_patch(w.rng(), 96, centre) for centre, _, _ in rows])
        y = np.array([c for c, _, _ in rows], np.uint8).reshape(-1, 1, 1, 1)
        for suffix, data in (("x", x), ("y", y)):
            with h5py.File(w.path(f"camelyonpatch_level_2_split_{name}_{suffix}.h5"), "w") as fh:
                fh.create_dataset(suffix, data=data, chunks=(1, *data.shape[1:]), compression="gzip")
        rng = w.rng()
        meta = [[i, int(rng.integers(0, 90000)), int(rng.integers(0, 200000)), any_, centre, slide]
                for i, (centre, any_, slide) in enumerate(rows)]  # fmt: skip
        w.csv(f"camelyonpatch_level_2_split_{name}_meta.csv", PCAM_META, meta)
        for centre, _, slide in rows:
            classes[PCAM_PHRASES[str(centre)]] += 1
            splits[{"train": "train", "valid": "val", "test": "test"}[name]] += 1
            slides.add(slide)
    return expected(sum(classes.values()), dict(classes), {}, splits=dict(splits), groups=len(slides))


def _he_patch(rng: np.random.Generator, n: int, tumour: bool) -> np.ndarray:
    """An H&E-like RGB patch of smooth random stain (pink stroma; purple where ``tumour``)."""
    hem = np.clip(0.6 + 0.5 * D.smooth_noise(rng, n, n, max(n / 12, 2)), 0, 2) * (1.6 if tumour else 0.5)
    eos = np.clip(0.8 + 0.4 * D.smooth_noise(rng, n, n, max(n / 8, 2)), 0, 2)
    from .pathology import EOSIN, GLASS, HAEMATOXYLIN

    od = eos[..., None] * EOSIN + hem[..., None] * HAEMATOXYLIN
    return np.clip(np.exp(-od) * GLASS, 0, 255).astype(np.uint8)


CAMELYON_PATCH = 512
LEFT_BETWEEN = "lesions: tumour fraction between thresholds"


def _slide(w: Writer, rel: str, tissue: list[tuple[int, int]], tumour: list[tuple[int, int, int, int]]) -> None:
    """A 3 x 4 grid of 512 px patches (level 0 1536 x 2048): tissue on the listed (row, col) patches,
    white glass elsewhere, purple tumour inside the level-0 boxes (x0, y0, x1, y1)."""
    from .pathology import pyramid, write_slide

    h, w_ = 3 * CAMELYON_PATCH, 4 * CAMELYON_PATCH
    rgb = np.full((h, w_, 3), 246, np.uint8)
    p = CAMELYON_PATCH
    for r, c in tissue:
        rgb[r * p : (r + 1) * p, c * p : (c + 1) * p] = _he_patch(w.rng(), p, False)
    for x0, y0, x1, y1 in tumour:
        rgb[y0:y1, x0:x1] = _he_patch(w.rng(), max(y1 - y0, x1 - x0), True)[: y1 - y0, : x1 - x0]
    write_slide(pyramid(rgb), w.path(rel))


def _camelyon16(w: Writer) -> dict:
    top = "CAMELYON16"
    p = CAMELYON_PATCH
    # tumor_001: tissue in columns 1-3 (9 patches), glass in column 0 (3 background patches). Outlines:
    # patch (0,1) all tumour and (0,2) three quarters (both positive), (1,1) tumour with a hole over three
    # quarters of it (a quarter left: in between, left out), (2,3) all tumour: 3 positive, 5 negative.
    tissue = [(r, c) for r in range(3) for c in range(1, 4)]
    boxes = [(p, 0, 2 * p + 3 * p // 4, p), (p, p, 2 * p, 2 * p), (3 * p, 2 * p, 4 * p, 3 * p)]
    hole = (p, p, 2 * p, p + 3 * p // 4)
    drawn = [boxes[0], boxes[2], (p, p + 3 * p // 4, 2 * p, 2 * p)]  # tumour pixels: the outlines less the hole
    _slide(w, f"{top}/training/tumor/tumor_001.tif", tissue, drawn)
    square = lambda x0, y0, x1, y1: [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]  # noqa: E731
    write_asap(w.path(f"{top}/training/lesion_annotations/tumor_001.xml"), [square(*b) for b in boxes], [square(*hole)])
    # normal_001: tissue on 6 patches, no outlines (a normal slide has none): 6 negative, 6 background
    _slide(w, f"{top}/training/normal/normal_001.tif", [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)], [])
    # the test part: excluded by name (its labels are only in testing/reference.csv)
    from .pathology import write_slide

    write_slide([np.full((512, 512, 3), 246, np.uint8)], w.path(f"{top}/testing/images/test_001.tif"))
    w.csv(f"{top}/testing/reference.csv", None, [["test_001", "Normal"]])
    w.text(f"{top}/README.md", "CAMELYON16 (replica)\n")
    left_out = {"test slide (labels only in testing/reference.csv)": 1}
    return expected(
        3 + 5 + 6,
        {"metastasis": 3, "no presence of metastasis": 11},
        {**left_out, LEFT_BETWEEN: 1},
        splits=hash_split(2, "slide"),
        background=3 + 6,
        listing={"items": 2, "classes": {"metastasis": 1, "no presence of metastasis": 1}, "left_out": left_out},
    )


MSD_PHRASE = "a glioma with peritumoral edema"
LEFT_MASK = "volume.mask: slice without a mask voxel"


def _msd_brain_tumour(w: Writer) -> dict:
    top = "Task01_BrainTumour"
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS-like storage, as many MSD volumes: reoriented on read
    shape, depth = (48, 40), 12
    cases = [(1, range(4, 8)), (2, range(3, 9))]  # (case, slices the tumour label touches)
    kept = dropped = 0
    for case, tumour in cases:
        vol = np.stack(
            [np.stack([_mr_slab(w.rng(), shape, m) for k in range(depth)], axis=-1) for m in range(4)], axis=-1
        ).astype(np.float32)  # (x, y, z, modality): FLAIR, T1w, t1gd, T2w
        label = np.zeros((*shape, depth), np.uint8)
        for k in tumour:
            label[20:28, 15:22, k] = 1 + k % 3
        write_nifti(w.path(f"{top}/imagesTr/BRATS_{case:03d}.nii.gz"), vol, affine)
        write_nifti(w.path(f"{top}/labelsTr/BRATS_{case:03d}.nii.gz"), label, affine)
        kept, dropped = kept + len(tumour), dropped + depth - len(tumour)
    w.path(f"{top}/imagesTr/._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    write_nifti(w.path(f"{top}/imagesTs/BRATS_485.nii.gz"), np.zeros((*shape, depth, 4), np.float32) + 1, affine)
    dataset = {
        "name": "BRATS", "tensorImageSize": "4D", "licence": "CC-BY-SA 4.0",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(cases), "numTest": 1,
        "training": [{"image": f"./imagesTr/BRATS_{c:03d}.nii.gz", "label": f"./labelsTr/BRATS_{c:03d}.nii.gz"}
                     for c, _ in cases],
        "test": ["./imagesTs/BRATS_485.nii.gz"],
    }  # fmt: skip
    w.text(f"{top}/dataset.json", json.dumps(dataset, indent=4) + "\n")
    left = {"macOS metadata (._ files)": 1}
    return expected(
        kept,
        {MSD_PHRASE: kept},
        {**left, LEFT_MASK: dropped},
        splits=hash_split(len(cases), "patient"),
        listing={"items": len(cases), "classes": {MSD_PHRASE: len(cases)}, "left_out": left},
    )


def _mr_slab(rng: np.random.Generator, shape: tuple[int, int], modality: int) -> np.ndarray:
    """One slice of one modality: a head ellipse with its own smooth texture (no two slices alike)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    head = ((yy - shape[0] / 2) / (shape[0] * 0.42)) ** 2 + ((xx - shape[1] / 2) / (shape[1] * 0.4)) ** 2 < 1
    tex = D.smooth_noise(rng, *shape, 4)
    return head * (400 + 150 * modality + 120 * tex) + 5 * rng.standard_normal(shape)


BUILDERS = {
    "rspect": _rspect,
    "chexpert": _chexpert,
    "cbis-ddsm": _cbis,
    "vindr-mammo": _vindr,
    "busi": _busi,
    "hyperkvasir": _hyperkvasir,
    "kvasir-v2": _kvasir,
    "kermany-oct": _kermany,
    "eyepacs": _eyepacs,
    "aptos2019": _aptos,
    "isic2019": _isic,
    "fitzpatrick17k": _fitzpatrick,
    "ddi": _ddi,
    "figshare-brain-tumor": _figshare,
    "cholec80": _cholec80,
    "sar-rarp50": _sar_rarp50,
    "camelyon16": _camelyon16,
    "pcam": _pcam,
    "msd-brain-tumour": _msd_brain_tumour,
}

# What each entry's `expect` rests on: the catalog rules (jobs/configs/sources/paper.yaml) it assumes.
ASSUMES = {
    "rspect": [
        "files.glob train/*/*/*.dcm (test/ not listed); label pe_present_on_image 1/0 -> pulmonary embolism /"
        " no presence of pulmonary embolism",
        "caps.per_class: min (every PE-positive slice plus as many negatives), left out as 'cap per_class'",
        "group: StudyInstanceUID; no split: the study-level hash split",
    ],
    "chexpert": [
        "label.columns Lung Opacity, Pleural Effusion, Cardiomegaly, Edema; uncertain (-1.0) and blank -> negative",
        "filters 'lateral view' (Frontal/Lateral) and 'not an AP view' (AP/PA), left out as 'filter: <reason>'",
        "label.none: leave_out, counted as 'no mapped finding' (No Finding only, or only uncertain labels)",
        "train.csv and valid.csv both tables; no split: the patient hash split (group: patient(\\d+) on Path)",
    ],
    "cbis-ddsm": [
        "the four case-description CSVs as tables (required columns common to both header spellings)",
        "files.exclude 'ROI crop or mask': CBIS-DDSM/*_[0-9]/*/*/*.dcm",
        "files and rows meet on the case folder (first path segment); rows: union",
        "pathology MALIGNANT -> malignant, BENIGN and BENIGN_WITHOUT_CALLBACK -> benign",
        "split from each table's set subset (train/test); group: patient_id",
    ],
    "vindr-mammo": [
        "labels from finding_annotations.csv finding_categories (list literal), rows: union, every category mapped"
        " to its lower-case phrase",
        "split column: training -> train, test -> test; group: study_id; the entry folder holds images/ directly",
    ],
    "busi": [
        "label from the class folder: benign/malignant/normal -> 'a benign lesion', 'a malignant lesion',"
        " 'normal tissue'",
        "files.exclude 'segmentation mask': *_mask*.png; no group: each image alone",
    ],
    "hyperkvasir": [
        "files.glob labeled-images/*/*/*/*.jpg (unlabeled-images/ and segmented-images/ not listed)",
        "label from the finding folder, every finding mapped (cecum -> 'a normal cecum', z-line -> 'a normal Z-line',"
        " bbps-2-3 -> 'good bowel preparation'); image-labels.csv not read",
    ],
    "kvasir-v2": [
        "label from the class folder, all eight mapped (normal-* -> 'a normal ...', dyed-resection-margins ->"
        " 'dyed resection margins')",
    ],
    "kermany-oct": [
        "files.glob **/*.jpeg; files.exclude 'macOS metadata': __MACOSX/**",
        "split from the folder (train/test/val); group: the patient id in the file name",
    ],
    "eyepacs": [
        "files.glob train/*.jpeg (test/ not listed); key {stem} = trainLabels.csv image; unlisted: leave_out, counted"
        " as 'unlabelled (no row in trainLabels.csv)'",
        "level 0-4 -> '<no|mild|moderate|severe|proliferative> diabetic retinopathy'; group: ^(\\d+)_ on image",
    ],
    "aptos2019": [
        "files.glob train_images/*.png (test_images/ not listed); key {stem} = id_code; diagnosis as EyePACS levels",
    ],
    "isic2019": [
        "one-hot columns, all eight diagnoses mapped (BKL -> seborrheic keratosis, AK -> actinic keratosis,"
        " DF -> dermatofibroma, VASC -> vascular lesion)",
        "metadata joined on image (how: left); group lesion_id, blank -> the file is its own group",
    ],
    "fitzpatrick17k": [
        "images at images/<md5hash>.jpg; label three_partition_label -> 'non-neoplastic skin condition',"
        " 'benign skin lesion', 'malignant skin lesion'",
        "filter qc not_in ['3 Wrongly labelled'] as 'wrongly labelled (qc)'; a row with no image is a reject",
    ],
    "ddi": [
        "files.glob **/*.png and table **/ddi_metadata.csv (here in ddidiversedermatologyimages/, after an unnamed"
        " index column); key {name} = DDI_file",
        "label malignant True/False -> 'malignant skin lesion' / 'benign skin lesion'",
    ],
    "figshare-brain-tumor": [
        "reader mat: cjdata/label and cjdata/PID read at listing; v7.3 through h5py and v5 through scipy.io",
        "a file that is no MATLAB file: listing reject 'not a MATLAB file'; files.exclude cvind.mat",
        "label 1/2/3 -> meningioma / glioma / pituitary tumor; group: the decoded PID (patient hash split)",
    ],
    "cholec80": [
        "reader video: phase file video{video}-phase.txt (Frame<TAB>Phase), fps 25, every 25: frames 0, 25, 50, ..."
        " of each video; the other annotated frames left out as 'video.every: ...'",
        "an annotated frame past the video's end: a read reject; group: the video (hash split)",
    ],
    "sar-rarp50": [
        "reader video: {parent}/action_discrete.txt, headerless frame,action (frame zero-padded in one clip),"
        " fps 60, every 6 (10 Hz)",
        "action 0 (Other) left out as 'unmapped label (action)'; video_11_1 and video_11_2 one operation (group)",
        "official split: train1 -> train, test -> test",
    ],
    "camelyon16": [
        "reader wsi, level 0, 512 px patches, tissue_fraction 0.5; tumour slides labelled patch by patch from"
        " training/lesion_annotations/{slide}.xml (groups _0 tumour, _2 holes)",
        "fraction >= 0.5 metastasis, 0 negative, in between left out ('lesions: ...'); a normal slide without XML:"
        " every tissue patch negative; glass patches are background (not corpus, not left out)",
        "testing/ slides excluded by name; group: the slide (hash split)",
    ],
    "pcam": [
        "reader hdf5 on the _x.h5 files (dataset x), one element per row; meta CSV row i (unnamed index column,"
        " aliased to index) is patch i, key {subset}/{index}",
        "label center_tumor_patch True/False -> metastasis / no presence of metastasis; official split"
        " (valid -> val); group: the wsi column",
    ],
    "msd-brain-tumour": [
        "reader nifti: 4-D imagesTr volumes, channel 0 (FLAIR), axis 2 after RAS+ reorientation, mask"
        " labelsTr/{case}.nii.gz: slices without a label voxel left out as 'volume.mask: ...'",
        "._ metadata excluded; imagesTs not listed; group: the case (hash split)",
    ],
}

# (label table, required column to rename) / folder to remove / (file, its new name), per entry
BREAK_TARGETS: dict[str, dict] = {
    "rspect": {
        "header": ("train.csv", "pe_present_on_image"),
        "folder": "train",
        "file": ("train.csv", "train_labels.csv"),
    },
    "chexpert": {
        "header": ("CheXpert-v1.0-small/train.csv", "Frontal/Lateral"),
        "folder": "CheXpert-v1.0-small/train",
        "file": ("CheXpert-v1.0-small/train.csv", "CheXpert-v1.0-small/train_labels.csv"),
    },
    "cbis-ddsm": {
        "header": ("mass_case_description_train_set.csv", "image file path"),
        "folder": "CBIS-DDSM",
        "file": ("mass_case_description_train_set.csv", "mass_case_description_train.csv"),
    },
    "vindr-mammo": {
        "header": ("finding_annotations.csv", "finding_categories"),
        "folder": "images",
        "file": ("finding_annotations.csv", "findings.csv"),
    },
    "busi": {"folder": "Dataset_BUSI_with_GT", "file": ("Dataset_BUSI_with_GT/benign", "Dataset_BUSI_with_GT/Benign")},
    "hyperkvasir": {  # image-labels.csv is not read (labels from the finding folders)
        "folder": "labeled-images",
        "file": (
            "labeled-images/lower-gi-tract/pathological-findings/polyps",
            "labeled-images/lower-gi-tract/pathological-findings/polyp",
        ),
    },
    "kvasir-v2": {"folder": "kvasir-dataset-v2", "file": ("kvasir-dataset-v2", "kvasir-dataset")},
    "kermany-oct": {"folder": "OCT2017", "file": ("OCT2017/train", "OCT2017/training")},
    "eyepacs": {
        "header": ("trainLabels.csv", "level"),
        "folder": "train",
        "file": ("trainLabels.csv", "trainlabels.csv"),
    },
    "aptos2019": {
        "header": ("train.csv", "diagnosis"),
        "folder": "train_images",
        "file": ("train.csv", "train_labels.csv"),
    },
    "isic2019": {
        "header": ("ISIC_2019_Training_GroundTruth.csv", "MEL"),
        "folder": "ISIC_2019_Training_Input",
        "file": ("ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_GroundTruth (1).csv"),
    },
    "fitzpatrick17k": {
        "header": ("fitzpatrick17k.csv", "md5hash"),
        "folder": "images",
        "file": ("fitzpatrick17k.csv", "fitzpatrick17k (1).csv"),
    },
    "ddi": {
        "header": ("ddidiversedermatologyimages/ddi_metadata.csv", "DDI_file"),
        "folder": "ddidiversedermatologyimages",
        "file": ("ddidiversedermatologyimages/ddi_metadata.csv", "ddidiversedermatologyimages/metadata.csv"),
    },
    "figshare-brain-tumor": {"folder": "brainTumorDataPublic_1-766"},
    "cholec80": {
        "header": ("cholec80/phase_annotations/video01-phase.txt", "Phase"),
        "folder": "cholec80/phase_annotations",
        "file": ("cholec80/phase_annotations/video01-phase.txt", "cholec80/phase_annotations/video01-phases.txt"),
    },
    "sar-rarp50": {  # action_discrete.txt has no header
        "folder": "train1",
        "file": ("test/video_41/action_discrete.txt", "test/video_41/action_continuous.txt"),
    },
    "camelyon16": {
        "folder": "CAMELYON16/training/lesion_annotations",
        "file": ("CAMELYON16/training/lesion_annotations/tumor_001.xml", "CAMELYON16/training/tumor_001.xml"),
    },
    "pcam": {
        "header": ("camelyonpatch_level_2_split_train_meta.csv", "center_tumor_patch"),
        "file": ("camelyonpatch_level_2_split_valid_meta.csv", "camelyonpatch_level_2_split_valid_meta (1).csv"),
    },
    "msd-brain-tumour": {
        "folder": "Task01_BrainTumour/labelsTr",
        "file": ("Task01_BrainTumour/labelsTr/BRATS_002.nii.gz", "Task01_BrainTumour/labelsTr/BRATS_002.nii"),
    },
}


# Breaks that the shipped catalog's ingest reports as rejects or an empty corpus rather than a ConfigError
# (folder-labelled entries have no label file to rename: a renamed class folder makes rejects).
BREAKS_WITHOUT_ERROR = {
    ("busi", "file"),
    ("hyperkvasir", "file"),
    ("kermany-oct", "file"),
    ("cholec80", "folder"),  # each video: "no annotation file" reject
    ("cholec80", "file"),
    ("sar-rarp50", "file"),
    ("camelyon16", "folder"),  # the tumour slide: "no lesion annotation file" reject
    ("camelyon16", "file"),
    ("msd-brain-tumour", "folder"),  # each volume: "no mask file" reject
    ("msd-brain-tumour", "file"),
}


def generate_replicas(out: str | Path, seed: int = 0, entries: list[str] | None = None) -> dict:
    """Write OUT/<entry>/... for each entry (default: SUPPORTED) and OUT/replicas.json; return its content.

    Byte-identical for a seed: every draw comes from GenContext's (seed, entry, index) RNGs, UIDs and
    names are hashed from the seed, and no timestamps are written.
    """
    names = list(SUPPORTED if entries is None else entries)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown replica entries {unknown}; choose from {', '.join(SUPPORTED)}")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_FILE).is_file():
        raise FileExistsError(f"{out} exists and was not written by medisyn.phantoms.replicas; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).write_text("generated by medisyn.phantoms.replicas; safe to delete\n")
    info = {"generator": "medisyn.phantoms.replicas", "seed": int(seed), "catalog": "paper", "entries": {}}
    for name in names:
        shutil.rmtree(out / name, ignore_errors=True)
        w = Writer(out, name, int(seed))
        expect = BUILDERS[name](w)
        info["entries"][name] = {"files": sorted(w.files), "expect": expect, "assumes": ASSUMES[name]}
    (out / "replicas.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def break_replica(out: str | Path, entry: str, how: str) -> str:
    """Make one replica wrong the way a download can be, for tests of `medisyn sources check`.

    how: "header" renames a required column of the entry's label table, "folder" removes a folder the
    description needs, "file" renames a label file (or, for folder-labelled entries, a folder).
    Returns a sentence saying what changed.
    """
    if how not in BREAKS:
        raise ValueError(f"how must be one of {', '.join(BREAKS)}, not {how!r}")
    target = BREAK_TARGETS[entry].get(how)
    if target is None:
        raise ValueError(f"replica {entry!r} has no label table, so no header to break")
    root = Path(out) / entry
    if how == "header":
        rel, column = target
        path = root / rel
        text = path.read_text(encoding="utf-8")
        head, rest = text.split("\n", 1)
        delimiter = "\t" if "\t" in head else ","  # Cholec80's phase files are TAB-separated
        cells = next(csv.reader([head], delimiter=delimiter))
        cells = [f"{c}_renamed" if c == column else c for c in cells]
        buf = io.StringIO()
        csv.writer(buf, delimiter=delimiter, lineterminator="\n").writerow(cells)
        path.write_text(buf.getvalue() + rest, encoding="utf-8")
        return f"{entry}: column {column!r} of {rel} renamed to {column + '_renamed'!r}"
    if how == "folder":
        shutil.rmtree(root / target)
        return f"{entry}: folder {target} removed"
    old, new = target
    (root / old).rename(root / new)
    return f"{entry}: {old} renamed to {new}"


def run_cli(cfg, out: str | None, seed: int | None) -> dict:
    """``medisyn phantoms --layout paper [--out DIR]``: default folder <run_dir>/replicas beside the phantoms."""
    from .stage import phantoms_dir

    target = Path(out) if out else phantoms_dir(cfg).parent / "replicas"
    info = generate_replicas(target, cfg.phantoms.seed if seed is None else seed)
    print(f"replicas of the paper's source repositories in {target}:")
    for name, e in info["entries"].items():
        x = e["expect"]
        left = sum(x["left_out"].values())
        print(f"  {name:16s} {len(e['files']):>3} files  corpus {x['corpus']:>3}  left out {left}")
    print(f"  expected ingest results: {target / 'replicas.json'}; check with: medisyn sources check")
    return info
