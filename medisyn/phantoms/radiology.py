"""Radiology DICOM phantoms: CT pulmonary angiography, brain MRI, mammography.

Each class signal is large and high-contrast (PE filling defect, enhancing
tumour, spiculated vs circumscribed mass) while position, size, anatomy and
intensity scaling vary within a class so a classifier must see the finding.
"""

from __future__ import annotations

import numpy as np

from . import dicom_io as dio
from . import draw as D
from .common import GenContext, GenResult, class_schedule

CT = 192
MR = 192
MAMMO_HW = (256, 160)


# --------------------------------------------------------------------- CTPA
def ct_anatomy(prng: np.random.Generator) -> dict:
    """Per-patient body habitus, shared by all slices of the series."""
    return {
        "cy": 96 + prng.uniform(-6, 6),
        "cx": 96 + prng.uniform(-6, 6),
        "ry": prng.uniform(58, 68),
        "rx": prng.uniform(80, 88),
        "lung_rx": prng.uniform(26, 32),
        "lung_ry": prng.uniform(40, 48),
        "pa_r": prng.uniform(11, 14),
        "side": int(prng.integers(0, 2)),
        "clot": prng.uniform(0.55, 0.7),
        "spacing": prng.uniform(1.7, 2.0),
    }


def ct_slice_hu(a: dict, rng: np.random.Generator, t: float, pe: bool) -> np.ndarray:
    """HU image of one axial slice at relative height t in [0, 1]."""
    n, E = CT, D.ellipse
    cy, cx, ry, rx = a["cy"], a["cx"], a["ry"] * (0.97 + 0.06 * t), a["rx"]
    hu = np.full((n, n), -1000.0, np.float32)
    body = E(n, n, cy, cx, ry, rx, soft=1.5)
    hu = D.compose(hu, body, -100.0)  # subcutaneous fat
    hu = D.compose(hu, E(n, n, cy, cx, ry - 6, rx - 7), 45.0)  # muscle / soft tissue
    for sgn in (-1, 1):  # lungs with texture and small vessels
        lx = cx + sgn * (rx * 0.45)
        lung = D.blob(
            n,
            n,
            cy - 2,
            lx,
            a["lung_ry"],
            rng,
            irregularity=0.06,
            harmonics=3,
            aspect=a["lung_ry"] / a["lung_rx"],
            angle=np.pi / 2,
        )
        hu = D.compose(hu, lung, -850.0 + 25 * D.smooth_noise(rng, n, n, 12))
        hu = D.compose(hu, lung * D.dots(rng, n, n, 25, 1.4), 60.0)
    # ribs around the body wall, spine with cortex and canal
    for ang in np.linspace(0.15 * np.pi, 0.85 * np.pi, 5):
        for sgn in (-1, 1):
            ry_, rx_ = cy + (ry - 9) * np.sin(ang) * 0.92, cx + sgn * (rx - 9) * np.cos(ang)
            hu = D.compose(hu, E(n, n, ry_ - 14 * np.sin(ang), rx_, 3.5, 5.5, angle=sgn * ang), 700.0)
    vy = cy + ry * 0.62
    hu = D.compose(hu, E(n, n, vy, cx, 12, 13), 950.0)
    hu = D.compose(hu, E(n, n, vy, cx, 9.5, 10.5), 420.0)
    hu = D.compose(hu, E(n, n, vy + 14, cx, 4.5, 4.5), 30.0)
    # contrast-filled vessels: ascending/descending aorta, pulmonary trunk and branches
    pr = a["pa_r"] * (1.05 - 0.15 * t)
    hu = D.compose(hu, E(n, n, cy - 14, cx - 9, 11, 11), 260.0)
    hu = D.compose(hu, E(n, n, vy - 17, cx + 13, 9, 9), 250.0)
    ty, tx = cy - 20, cx + 12
    hu = D.compose(hu, E(n, n, ty, tx, pr * 1.2, pr * 1.2), 320.0)
    branch = {}
    for k, sgn in enumerate((-1, 1)):  # right PA (image left), left PA (image right)
        by, bx = ty + 10, tx + sgn * (24 if sgn > 0 else 30)
        ang = np.arctan2(by - ty, bx - tx)
        length = np.hypot(by - ty, bx - tx) / 2 + 6
        branch[k] = ((ty + by) / 2, (tx + bx) / 2, ang, length)
        hu = D.compose(hu, E(n, n, (ty + by) / 2, (tx + bx) / 2, pr * 0.8, length, angle=ang), 320.0)
    if pe:  # large hypodense filling defect (~40 HU) in one main branch + trunk extension
        my, mx, ang, length = branch[a["side"]]
        clot = E(n, n, my, mx, pr * 0.8 * a["clot"], length * 0.75, angle=ang, soft=1.0)
        clot = np.maximum(clot, E(n, n, ty, tx, pr * 1.2 * a["clot"], pr * 1.2 * a["clot"], soft=1.0))
        hu = D.compose(hu, clot, 40.0)
    hu += 14 * rng.standard_normal((n, n)).astype(np.float32)
    return D.blur(hu, 0.6)


def ct_patient(ctx: GenContext, p: int) -> tuple[dict, int, str, bool]:
    """(anatomy, number of slices, series UID, has PE) of CTPA patient `p`."""
    prng = ctx.patient_rng(p)
    a = ct_anatomy(prng)
    return a, int(prng.integers(4, 9)), ctx.uid("series", p), p % 2 == 1


def ctpa(ctx: GenContext, repo, n_per_class: int) -> GenResult:
    rows, col = [], repo.label_columns[0]
    for p in range(2 * n_per_class):
        a, n_sl, series, pe = ct_patient(ctx, p)
        for k in range(n_sl):
            rel = f"{ctx.patient_id(p)}/{series}/slice_{k:03d}.dcm"
            write_ct_slice(ctx, p, k, n_sl, a, pe, series, ctx.path(rel), ctx.rng(p * 100 + k))
            rows.append({repo.path_column: rel, repo.patient_column: ctx.patient_id(p), col: int(pe)})
    return GenResult(rows, files=len(rows), frames=len(rows))


def write_ct_slice(ctx, p, k, n_sl, a, pe, series, path, rng, pixels: bool = True) -> None:
    """One CT Image Storage file; `pixels=False` plants a header-only file."""
    t = k / max(n_sl - 1, 1)
    hu = ct_slice_hu(a, rng, t, pe)
    stored = np.clip(np.rint(hu + 1024), -1024 + 1024, 4095).astype(np.int16)
    thick, sp = 2.5, round(a["spacing"], 4)
    z = -150.0 + k * thick
    ds = dio.new_dataset(
        ctx,
        p,
        dio.CT_IMAGE,
        ctx.uid("sop", p, k),
        "CT",
        series,
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
        SeriesDescription="CTA CHEST PE PROTOCOL",
        BodyPartExamined="CHEST",
        KVP=100,
        SliceThickness=thick,
        SpacingBetweenSlices=thick,
        PixelSpacing=[sp, sp],
        ImagePositionPatient=[round(-CT * sp / 2, 3), round(-CT * sp / 2, 3), z],
        ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
        SliceLocation=z,
        InstanceNumber=k + 1,
        FrameOfReferenceUID=ctx.uid("for", p),
        RescaleIntercept=-1024,
        RescaleSlope=1,
        RescaleType="HU",
        WindowCenter=100,
        WindowWidth=700,
        PatientPosition="FFS",
    )
    dio.set_pixels(ds, stored, "MONOCHROME2")
    if not pixels:
        del ds.PixelData
    dio.save(ds, path)


# ---------------------------------------------------------------- brain MRI
def mr_image(prng: np.random.Generator, rng: np.random.Generator, cls: str) -> np.ndarray:
    """T1 post-contrast-like axial slice (uint16, 12-bit) with hot outliers."""
    n, E = MR, D.ellipse
    cy, cx = 96 + rng.uniform(-5, 5), 96 + rng.uniform(-5, 5)
    ry, rx = prng.uniform(78, 84), prng.uniform(62, 68)
    ang = rng.uniform(-0.12, 0.12)
    img = np.zeros((n, n), np.float32)
    img = D.compose(img, E(n, n, cy, cx, ry, rx, ang), 900.0)  # scalp fat
    img = D.compose(img, E(n, n, cy, cx, ry - 5, rx - 5, ang), 90.0)  # skull
    img = D.compose(img, E(n, n, cy, cx, ry - 9, rx - 9, ang), 220.0)  # CSF
    brain = E(n, n, cy, cx, ry - 11, rx - 11, ang)
    gyri = (D.smooth_noise(rng, n, n, 5) > 0.2).astype(np.float32)
    deep = E(n, n, cy, cx, ry - 24, rx - 22, ang, soft=6)
    wm = np.clip(deep * 0.7 + 0.3 * gyri * deep, 0, 1)
    img = D.compose(img, brain, 560.0 + 25 * D.smooth_noise(rng, n, n, 10))
    img = D.compose(img, brain * wm, 760.0)
    for sgn in (-1, 1):  # lateral ventricles and midline falx
        img = D.compose(img, E(n, n, cy - 4, cx + sgn * 9, 20, 5, sgn * 0.25), 180.0)
    img = D.compose(img, brain * E(n, n, cy, cx, ry, 1.0, ang), 300.0)
    yy, xx = D.grid(n, n)
    if cls == "glioma":  # intra-axial, ring enhancing, necrotic core, oedema
        r = rng.uniform(14, 24)
        th, rr = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.45)
        ty, tx = cy + rr * (ry - 20) * np.sin(th), cx + rr * (rx - 20) * np.cos(th)
        edema = D.blob(n, n, ty, tx, r * 1.7, rng, 0.25, soft=5) * brain
        mass = D.blob(n, n, ty, tx, r, rng, 0.2)
        core = D.blob(n, n, ty, tx, r * 0.62, rng, 0.25)
        img = D.compose(img, edema, 430.0)
        img = D.compose(img, mass, 1350.0 + 80 * rng.standard_normal((n, n)).astype(np.float32))
        img = D.compose(img, core, 240.0)
    elif cls == "meningioma":  # extra-axial, dural based, homogeneously enhancing
        r = rng.uniform(13, 21)
        th = rng.uniform(0, 2 * np.pi)
        ty, tx = cy + (ry - 11 - r * 0.55) * np.sin(th), cx + (rx - 11 - r * 0.55) * np.cos(th)
        mass = D.ellipse(n, n, ty, tx, r, r * rng.uniform(0.9, 1.2), th, soft=1.5)
        tail = D.ellipse(n, n, cy + (ry - 11) * np.sin(th), cx + (rx - 11) * np.cos(th), 2.0, r * 1.6, th + np.pi / 2)
        img = D.compose(img, np.maximum(mass, tail * 0.8) * brain, 1250.0)
    img *= prng.uniform(0.85, 1.15)  # scanner gain per patient
    noise = 14 * rng.standard_normal((2, n, n)).astype(np.float32)
    img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude noise
    hot = rng.integers(0, n * n, int(rng.integers(8, 30)))
    img.ravel()[hot] = rng.uniform(3000, 4095, hot.size)
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


def brain_mri(ctx: GenContext, repo, n_per_class: int) -> GenResult:
    rows, col = [], repo.label_columns[0]
    for p, cls, i in class_schedule(ctx, list(repo.classes), n_per_class):
        arr = mr_image(ctx.patient_rng(p), ctx.rng(i), cls)
        rel = f"{ctx.patient_id(p)}/IM{i:05d}.dcm"
        ds = dio.new_dataset(
            ctx,
            p,
            dio.MR_IMAGE,
            ctx.uid("sop", i),
            "MR",
            ctx.uid("series", p),
            ImageType=["ORIGINAL", "PRIMARY", "M"],
            SeriesDescription="AX T1 POST GAD",
            ScanningSequence="SE",
            SequenceVariant="NONE",
            MagneticFieldStrength=1.5,
            RepetitionTime=500.0,
            EchoTime=12.0,
            SliceThickness=5.0,
            PixelSpacing=[1.2, 1.2],
            ImagePositionPatient=[-115.2, -115.2, 5.0 * i],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            InstanceNumber=i + 1,
            BodyPartExamined="BRAIN",
            FrameOfReferenceUID=ctx.uid("for", p),
        )
        dio.set_pixels(ds, arr, "MONOCHROME2", bits_stored=12)
        dio.save(ds, ctx.path(rel))
        rows.append({repo.path_column: rel, repo.patient_column: ctx.patient_id(p), col: cls})
    return GenResult(rows, files=len(rows), frames=len(rows))


# ------------------------------------------------------------- mammography
def mammo_image(prng: np.random.Generator, rng: np.random.Generator, cls: str, right: bool) -> np.ndarray:
    """Breast attenuation map (12-bit, bright = dense) with chest wall at x=0."""
    h, w = MAMMO_HW
    yy, xx = D.grid(h, w)
    cy = h / 2 + rng.uniform(-12, 12)
    ry, rx = rng.uniform(100, 120), rng.uniform(118, 150)
    d = np.sqrt(((yy - cy) / ry) ** 2 + (xx / rx) ** 2)
    breast = np.clip((1 - d) * 60, 0, 1)
    thickness = np.clip((1 - d) * 4, 0, 1) ** 0.5  # thinner near the skin
    dens = prng.uniform(0.2, 0.55)
    tex = D.smooth_noise(rng, h, w, 9, octaves=3)
    gland = np.clip(0.25 * tex + 1.1 * (1 - d) - 0.75 + dens, 0, 1) * (0.75 + 0.25 * tex)
    img = 250 + breast * (1300 * thickness + 650 * gland)
    pect = D.polygon_mask(h, w, [np.array([[0, 0], [rng.uniform(45, 70), 0], [0, rng.uniform(80, 120)]])])
    img = D.compose(img, pect * breast, 2500.0)
    if cls != "NORMAL":
        r = rng.uniform(12, 19)
        my = cy + rng.uniform(-0.45, 0.45) * ry
        mx = rng.uniform(0.3, 0.6) * rx
        if cls == "BENIGN":  # oval, circumscribed, homogeneous
            m = D.ellipse(h, w, my, mx, r, r * rng.uniform(1.1, 1.5), rng.uniform(0, np.pi), soft=1.0)
            img = img + m * 1300
        else:  # irregular spiculated mass + spicules + microcalcifications
            m = D.blob(h, w, my, mx, r * 0.9, rng, 0.3, spikes=int(rng.integers(12, 20)), spike_len=1.6)
            paths = [D.random_walk(rng, mx, my, a, 6, r * 0.45, 0.08) for a in rng.uniform(0, 2 * np.pi, 14)]
            lines = D.polyline_mask(h, w, paths, [1.2] * len(paths))
            calc = D.dots(rng, h, w, int(rng.integers(6, 14)), 0.9, weight=D.ellipse(h, w, my, mx, r * 1.3, r * 1.3))
            img = img + np.maximum(m, lines * 0.7) * 1300 + calc * 1500
    img = img * breast + 60 * (1 - breast)
    img += 25 * rng.standard_normal((h, w)).astype(np.float32)
    if right:  # right breast: chest wall on the image right
        img = img[:, ::-1]
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


def mammography(ctx: GenContext, repo, n_per_class: int) -> GenResult:
    rows, col = [], repo.label_columns[0]
    for p, cls, i in class_schedule(ctx, list(repo.classes), n_per_class, 2, 4):
        prng = ctx.patient_rng(p)
        right = bool(prng.random() < 0.5)
        arr = mammo_image(prng, ctx.rng(i), cls, right)
        mono1 = p % 2 == 0  # vendor-dependent photometric interpretation
        if mono1:
            arr = (4095 - arr).astype(np.uint16)
        rel = f"{ctx.patient_id(p)}/{ctx.uid('study', p)[-12:]}/{i:05d}.dcm"
        ds = dio.new_dataset(
            ctx,
            p,
            dio.MAMMO_PRESENTATION,
            ctx.uid("sop", i),
            "MG",
            ctx.uid("series", p),
            ImageType=["ORIGINAL", "PRIMARY"],
            PresentationIntentType="FOR PRESENTATION",
            ViewPosition=["CC", "MLO"][i % 2],
            ImageLaterality="R" if right else "L",
            BodyPartExamined="BREAST",
            PixelSpacing=[0.35, 0.35],
            InstanceNumber=i + 1,
            WindowCenter=2048,
            WindowWidth=4096,
            RescaleIntercept=0,
            RescaleSlope=1,
            PatientOrientation=["P", "L"] if right else ["A", "R"],
        )
        dio.set_pixels(ds, arr, "MONOCHROME1" if mono1 else "MONOCHROME2", bits_stored=12)
        dio.save(ds, ctx.path(rel))
        rows.append({repo.path_column: rel, repo.patient_column: ctx.patient_id(p), col: cls})
    return GenResult(rows, files=len(rows), frames=len(rows))


# ------------------------------------------------------- pituitary tumour MR (figshare's third class)
def pituitary_mr_image(prng: np.random.Generator, rng: np.random.Generator) -> np.ndarray:
    """Brain MR slice with a pituitary macroadenoma: the tumour-free slice of `mr_image` plus a homogeneously
    enhancing sellar mass with a suprasellar lobe ("snowman") at the skull-base midline, between the dark
    flow voids of the carotid arteries. Central and midline, where glioma is parenchymal and off-centre and
    meningioma sits on the convexity, so the three classes differ by where and how the mass looks."""
    img = mr_image(prng, rng, "notumor").astype(np.float32)
    n, E = MR, D.ellipse
    cy, cx = 96 + rng.uniform(-4, 4), 96 + rng.uniform(-3, 3)  # the sella: the centre of the skull base
    r = rng.uniform(10, 15)
    sella = E(n, n, cy + r * 0.35, cx, r * 0.8, r * rng.uniform(0.95, 1.15), rng.uniform(-0.1, 0.1), soft=1.5)
    lobe = E(n, n, cy - r * 0.55, cx + rng.uniform(-2, 2), r * 0.75, r * 0.7, soft=1.5)  # suprasellar extension
    mass = np.maximum(sella, lobe)
    rim = np.zeros((n, n), np.float32)
    for sgn in (-1, 1):  # carotid flow voids either side of the sella
        rim = np.maximum(rim, E(n, n, cy + r * 0.3, cx + sgn * (r * 1.15 + 3), 3.5, 3.0, soft=1.0))
    level = rng.uniform(1300.0, 1500.0)
    noise = 14 * rng.standard_normal((2, n, n)).astype(np.float32)
    mass_val = np.sqrt((level + noise[0]) ** 2 + noise[1] ** 2)  # Rician, as the rest of the slice
    img = D.compose(img, rim * (1 - mass), 20.0 + np.abs(noise[1]))
    img = D.compose(img, mass, mass_val)
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)
