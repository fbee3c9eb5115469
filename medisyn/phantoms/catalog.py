"""The phantom repositories: what each one is, where its labels live and how
its captions read. `repositories.yaml` (the ingest description) is rendered
from this catalog, so ingest and generator can never disagree.

All paths in a label CSV are relative to the repository directory, which is
also the directory holding the CSV.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import dermatology, gastro, ophthalmology, pathology, radiology, surgery, xray_us

KINDS = ("dicom", "wsi", "image")


@dataclass(frozen=True)
class PhantomRepo:
    name: str
    specialty: str
    image_type: str
    kind: str  # "dicom" | "wsi" | "image"
    glob: str  # relative to the repo dir; matches every image file incl. planted defects
    labels_csv: str  # relative to the repo dir
    path_column: str  # CSV column with the image path relative to the repo dir
    label_columns: tuple[str, ...]  # one = single-label; several = multi-label (1 = present)
    patient_column: str
    template: str  # caption with a {label} placeholder
    classes: dict[str, str]  # raw CSV value (or, multi-label, column name) -> caption phrase
    generate: Callable = field(repr=False, compare=False)  # (ctx, repo, n_per_class) -> GenResult
    per_class: tuple[int, int] = (10, 60)  # n_per_class at scale (small, medium)
    # official split column written into the labels CSV (as CheXpert, Cholec80 and Kvasir ship one),
    # drawn per patient and stratified so every class has a patient in every split; "" = ingest's
    # patient-hash split (kept for one repository, so the demo exercises both)
    split_column: str = "split"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test share of patients

    @property
    def multi_label(self) -> bool:
        return len(self.label_columns) > 1

    def ingest_entry(self) -> dict:
        """Plain-data description for repositories.yaml."""
        return {
            "name": self.name,
            "kind": self.kind,
            "path": self.name,
            "glob": self.glob,
            "labels_csv": self.labels_csv,
            "path_column": self.path_column,
            "label_columns": list(self.label_columns),
            "patient_column": self.patient_column,
            "template": self.template,
            "specialty": self.specialty,
            "image_type": self.image_type,
            "classes": dict(self.classes),
            **({"split_column": self.split_column} if self.split_column else {}),
        }


R = PhantomRepo
REPOSITORIES: tuple[PhantomRepo, ...] = (
    R(
        "ctpa",
        "radiology",
        "computed tomography",
        "dicom",
        "*/*/*.dcm",
        "labels.csv",
        "path",
        ("pe_present",),
        "patient_id",
        "Chest CT pulmonary angiography image showing {label}.",
        {"1": "pulmonary embolism", "0": "no presence of pulmonary embolism"},
        radiology.ctpa,
    ),
    R(
        "brain-mri",
        "radiology",
        "magnetic resonance imaging",
        "dicom",
        "*/*.dcm",
        "labels.csv",
        "path",
        ("label",),
        "patient_id",
        "Brain MRI image showing {label}.",
        {"glioma": "glioma", "meningioma": "meningioma", "notumor": "no tumor"},
        radiology.brain_mri,
    ),
    R(
        "mammography",
        "radiology",
        "X-ray",
        "dicom",
        "*/*/*.dcm",
        "labels.csv",
        "path",
        ("pathology",),
        "patient_id",
        "Mammogram image showing {label}.",
        {"NORMAL": "no findings", "BENIGN": "a benign mass", "MALIGNANT": "a malignant mass"},
        radiology.mammography,
    ),
    R(
        "chest-xray",
        "radiology",
        "X-ray",
        "image",
        "train/*/*/*.png",
        "train.csv",
        "Path",
        xray_us.FINDINGS,
        "patient_id",
        "Frontal (AP) chest X-ray image showing {label}.",
        {
            "Lung Opacity": "lung opacity",
            "Pleural Effusion": "pleural effusion",
            "Cardiomegaly": "cardiomegaly",
            "Edema": "edema",
        },
        xray_us.chest_xray,
        (30, 60),  # a utility-audit task: enough images for class-matched arms and a test set
        split_fractions=(0.6, 0.2, 0.2),  # test AUROCs on more than a handful of images
    ),
    R(
        "breast-us",
        "radiology",
        "ultrasound",
        "dicom",
        "*/*.dcm",
        "labels.csv",
        "path",
        ("label",),
        "patient_id",
        "Breast ultrasound image showing {label}.",
        {"normal": "normal tissue", "benign": "a benign lesion", "malignant": "a malignant lesion"},
        xray_us.breast_us,
        split_column="",
    ),
    R(
        "isic",
        "dermatology",
        "dermoscopy",
        "image",
        "images/*.jpg",
        "metadata.csv",
        "image",
        ("diagnosis",),
        "patient_id",
        "Dermoscopy image showing {label}.",
        {"MEL": "melanoma", "SK": "seborrheic keratosis", "BCC": "basal cell carcinoma", "NV": "melanocytic nevi"},
        dermatology.isic,
        (30, 60),  # a utility-audit task: enough images for class-matched arms and a test set
        split_fractions=(0.6, 0.2, 0.2),  # test AUROCs on more than a handful of images
    ),
    R(
        "derm-photos",
        "dermatology",
        "clinical images",
        "image",
        "*/*.jpg",
        "labels.csv",
        "path",
        ("condition",),
        "patient_id",
        "Clinical image showing {label}.",
        {"psoriasis": "psoriasis", "eczema": "eczema", "acne": "acne"},
        dermatology.derm_photos,
    ),
    R(
        "lymph-node-wsi",
        "pathology",
        "microscopy",
        "wsi",
        "slides/*.tiff",
        "slides.csv",
        "slide",
        ("label",),
        "patient_id",
        "Histopathological lymph node image showing {label} at 40x magnification.",
        {"tumor": "metastasis", "normal": "no presence of metastasis"},
        pathology.lymph_node_wsi,
        (5, 16),  # one slide per patient: 5 patients per class, so val and test get one each
    ),
    R(
        "oct",
        "ophthalmology",
        "optical coherence tomography",
        "image",
        "train/*/*.png",
        "labels.csv",
        "path",
        ("label",),
        "patient_id",
        "Optical coherence tomography image showing {label}.",
        {
            "NORMAL": "normal findings",
            "DRUSEN": "drusen",
            "CNV": "choroidal neovascularization",
            "DME": "diabetic macular edema",
        },
        ophthalmology.oct_repo,
    ),
    R(
        "fundus",
        "ophthalmology",
        "fundoscopy",
        "image",
        "images/*.jpg",
        "labels.csv",
        "path",
        ("label",),
        "patient_id",
        "Fundus photograph showing {label}.",
        {"normal": "no abnormalities", "diabetic_retinopathy": "diabetic retinopathy", "glaucoma": "glaucoma"},
        ophthalmology.fundus,
    ),
    R(
        "cholec",
        "surgery",
        "endoscopy",
        "image",
        "videos/*/*.jpg",
        "frames.csv",
        "path",
        ("phase",),
        "patient_id",
        "Laparoscopic cholecystectomy image during {label}.",
        {
            "Preparation": "preparation",
            "CalotTriangleDissection": "Calot's triangle dissection",
            "ClippingCutting": "clipping and cutting",
            "GallbladderPackaging": "gallbladder packaging",
            "CleaningCoagulation": "cleaning and coagulation",
        },
        surgery.cholec,
    ),
    R(
        "prostatectomy",
        "surgery",
        "endoscopy",
        "image",
        "*/frames/*.png",
        "actions.csv",
        "path",
        ("action",),
        "patient_id",
        "Robot-assisted radical prostatectomy image of {label}.",
        {
            "cutting_suture": "cutting the suture",
            "picking_needle": "picking up the needle",
            "positioning_needle": "positioning the needle tip",
            "pushing_needle": "pushing the needle through the tissue",
        },
        surgery.prostatectomy,
        (30, 60),  # a utility-audit task: enough images for class-matched arms and a test set
        split_fractions=(0.6, 0.2, 0.2),  # test AUROCs on more than a handful of images
    ),
    R(
        "kvasir",
        "gastroenterology",
        "endoscopy",
        "image",
        "images/*/*.jpg",
        "labels.csv",
        "path",
        ("label",),
        "patient_id",
        "Gastrointestinal endoscopy image showing {label}.",
        {
            "polyps": "polyps",
            "esophagitis": "esophagitis",
            "ulcerative-colitis": "ulcerative colitis",
            "dyed-lifted-polyps": "dyed and lifted polyps",
        },
        gastro.kvasir,
        (30, 60),  # four one-word-apart captions: 22 train images were too few to learn (docs/PERFORMANCE.md)
    ),
)
del R

BY_NAME: dict[str, PhantomRepo] = {r.name: r for r in REPOSITORIES}
