"""Radiology phantoms in other containers: CheXpert-style 16-bit PNG chest
X-rays (multi-label) and multi-frame DICOM breast ultrasound."""

from __future__ import annotations

import numpy as np

from . import dicom_io as dio
from . import draw as D
from .common import PATIENT_OFFSET, GenContext, GenResult, class_schedule, save_png, split_patients

CXR = 256
US_HW = (192, 256)
US_FRAMES = 3

FINDINGS = ("Lung Opacity", "Pleural Effusion", "Cardiomegaly", "Edema")
# several label combinations; every image has at least one finding
COMBOS = (
    ("Lung Opacity",),
    ("Pleural Effusion",),
    ("Cardiomegaly",),
    ("Edema",),
    ("Lung Opacity", "Pleural Effusion"),
    ("Cardiomegaly", "Edema"),
    ("Pleural Effusion", "Cardiomegaly"),
    ("Lung Opacity", "Edema"),
    ("Pleural Effusion", "Cardiomegaly", "Edema"),
    ("Lung Opacity", "Cardiomegaly"),
)


# -------------------------------------------------------------- chest X-ray
def cxr_image(rng: np.random.Generator, findings: tuple[str, ...]) -> np.ndarray:
    """AP chest radiograph, brightness = attenuation, as uint16 (full range)."""
    n, E = CXR, D.ellipse
    yy, xx = D.grid(n, n)
    cx, top = n / 2 + rng.uniform(-8, 8), rng.uniform(30, 45)
    tw = rng.uniform(88, 100)  # half thorax width
    img = np.full((n, n), 0.06, np.float32)
    img = D.compose(img, E(n, n, n * 0.75, cx, n * 0.7, tw + 30, soft=3), 0.52)  # torso
    img = D.compose(img, E(n, n, top - 10, cx, 30, tw + 40, soft=4), 0.48)  # shoulders
    base = top + rng.uniform(150, 170)
    lungs, lung_cx = [], []
    for sgn in (-1, 1):
        lcx = cx + sgn * tw * 0.5
        lung = D.blob(
            n,
            n,
            (top + base) / 2,
            lcx,
            (base - top) / 2,
            rng,
            0.05,
            harmonics=3,
            aspect=(base - top) / (tw * 0.8),
            angle=np.pi / 2,
            soft=3,
        )
        lungs.append(lung)
        lung_cx.append(lcx)
        ribs = np.cos(2 * np.pi * (yy - 0.004 * (xx - cx) ** 2) / 18) > 0.6  # posterior ribs
        img = D.compose(img, lung, 0.16 + 0.07 * ribs + 0.02 * D.smooth_noise(rng, n, n, 8))
    img = D.compose(img, E(n, n, (top + base) / 2 - 10, cx, (base - top) / 2, 11, soft=3), 0.62)  # spine
    cardio = "Cardiomegaly" in findings
    hw = tw * (rng.uniform(0.62, 0.72) if cardio else rng.uniform(0.36, 0.44))
    hy = base - rng.uniform(30, 40)
    heart = E(n, n, hy, cx + hw * 0.25, rng.uniform(34, 40) + (8 if cardio else 0), hw, rng.uniform(-0.3, -0.1), soft=3)
    img = D.compose(img, heart, 0.66)
    lung_any = np.clip(lungs[0] + lungs[1], 0, 1) * (1 - heart)
    if "Lung Opacity" in findings:  # focal consolidation in a lung field
        k = int(rng.integers(0, 2))
        oy = rng.uniform(top + 40, base - 40)
        op = D.blob(n, n, oy, lung_cx[k] + rng.uniform(-12, 12), rng.uniform(16, 26), rng, 0.25, soft=6)
        img += 0.32 * op * lungs[k] * (0.8 + 0.2 * D.smooth_noise(rng, n, n, 6))
    if "Pleural Effusion" in findings:  # dependent fluid with a meniscus at the base(s)
        sides = [0, 1] if rng.random() < 0.5 else [int(rng.integers(0, 2))]
        for k in sides:
            x_lat = lung_cx[k] + (2 * k - 1) * tw * 0.4
            level = base - rng.uniform(30, 50)
            men = level - 35 * np.exp(-np.abs(xx - x_lat) / 18)  # climbs the lateral wall
            img = D.compose(img, np.clip((yy - men) / 3, 0, 1) * lungs[k], 0.6)
    if "Edema" in findings:  # bilateral perihilar haze + interstitial streaks
        haze = sum(E(n, n, (top + base) / 2, cx + sgn * tw * 0.35, 45, 30, soft=25) for sgn in (-1, 1))
        paths = [
            D.random_walk(
                rng,
                cx + s * tw * 0.2,
                (top + base) / 2 + rng.uniform(-30, 30),
                (0 if s > 0 else np.pi) + rng.uniform(-0.7, 0.7),
                8,
                6,
                0.15,
            )
            for s in rng.choice([-1, 1], 26)
        ]
        streaks = D.polyline_mask(n, n, paths, [1.6] * len(paths))
        img += lung_any * (0.22 * np.clip(haze, 0, 1) + 0.16 * streaks)
    img = D.compose(img, E(n, n, rng.uniform(10, 30), rng.choice([20, n - 20]), 5, 7, soft=0.5), 0.95)  # marker
    img = D.blur(img, 1.0) + 0.012 * rng.standard_normal((n, n)).astype(np.float32)
    img = np.clip(img * rng.uniform(0.9, 1.1), 0, 1) ** rng.uniform(0.9, 1.1)
    return np.rint(img * 65535).astype(np.uint16)


def chest_xray(ctx: GenContext, repo, n_per_class: int) -> GenResult:
    n_img = int(np.ceil(n_per_class * len(COMBOS) / 4))
    sizes = split_patients(n_img, ctx.rng(PATIENT_OFFSET - 2), 1, 3)
    rows, i = [], 0
    for p, size in enumerate(sizes):
        prng = ctx.patient_rng(p)
        sex, age = ("Female" if prng.random() < 0.5 else "Male"), int(prng.integers(25, 90))
        for s in range(size):
            combo = COMBOS[i % len(COMBOS)]
            rel = f"train/patient{p + 1:05d}/study{s + 1}/view1_frontal.png"
            save_png(cxr_image(ctx.rng(i), combo), ctx.path(rel))
            row = {
                repo.path_column: rel,
                "Sex": sex,
                "Age": age + s,
                "Frontal/Lateral": "Frontal",
                "AP/PA": "AP",
                repo.patient_column: ctx.patient_id(p),
            }
            row.update({f: (1.0 if f in combo else 0.0) for f in FINDINGS})
            rows.append(row)
            i += 1
    return GenResult(rows, files=i, frames=i)


# ------------------------------------------------------------ breast US
def us_frames(prng: np.random.Generator, rng: np.random.Generator, cls: str) -> np.ndarray:
    """(frames, rows, cols) uint8 B-mode clip with speckle and probe motion."""
    h, w = US_HW
    H, W = h + 16, w + 24  # oversized canvas; frames are shifted crops
    yy, xx = D.grid(H, W)
    fat_d, gl_d = prng.uniform(35, 55), prng.uniform(110, 140)
    undul = 8 * D.smooth_noise(rng, 1, W, 40)[0]
    echo = np.where(yy < 8, 0.95, 0.32)  # skin line, then subcutaneous fat
    echo = np.where(yy > fat_d + undul, 0.62 + 0.12 * D.smooth_noise(rng, H, W, 10), echo)  # gland
    echo = np.where(yy > gl_d + undul, 0.35, echo)  # retromammary fat
    echo = np.where((yy > gl_d + 30 + undul) & (np.sin(yy / 2.2) > 0.3), 0.7, echo)  # pectoralis
    echo = D.blur(echo.astype(np.float32), 1.2)
    if cls != "normal":
        cy, cx = rng.uniform(fat_d + 25, gl_d - 5), rng.uniform(70, W - 70)
        r = rng.uniform(18, 28)
        if cls == "benign":  # oval, wider than tall, circumscribed, posterior enhancement
            les = D.ellipse(H, W, cy, cx, r * 0.6, r * rng.uniform(1.1, 1.4), rng.uniform(-0.15, 0.15), soft=1.5)
            column = np.clip((yy - cy) / 10, 0, 1) * np.exp(-(((xx - cx) / (r * 1.0)) ** 2))
            echo = echo * (1 + 0.55 * column * (1 - les))
            echo = D.compose(echo, les, 0.05)
        else:  # irregular, spiculated, taller than wide, echogenic halo, posterior shadowing
            les = D.blob(
                H,
                W,
                cy,
                cx,
                r * 0.8,
                rng,
                0.35,
                spikes=int(rng.integers(10, 16)),
                spike_len=0.7,
                aspect=0.75,
                angle=np.pi / 2,
            )
            halo = np.clip(D.blur(les, 3) * 1.6 - les, 0, 1)
            column = np.clip((yy - cy) / 6, 0, 1) * np.exp(-(((xx - cx) / (r * 0.7)) ** 4))
            echo = echo * (1 + 0.6 * halo) * (1 - 0.8 * column)
            echo = D.compose(echo, les, 0.10 + 0.05 * D.smooth_noise(rng, H, W, 4))
    atten = np.exp(-yy / H * prng.uniform(0.3, 0.7))
    frames = []
    base_speckle = rng.rayleigh(1.0, (H, W)).astype(np.float32)
    for f in range(US_FRAMES):
        sp = 0.6 * base_speckle + 0.4 * rng.rayleigh(1.0, (H, W)).astype(np.float32)
        sp = D.blur(sp, 0.7)
        img = echo * atten * sp * 170
        dy, dx = int(rng.integers(0, 6)) + 5, int(rng.integers(0, 10)) + 7 + 2 * f
        frames.append(img[dy : dy + h, dx : dx + w])
    return D.to_u8(np.stack(frames))


def breast_us(ctx: GenContext, repo, n_per_class: int) -> GenResult:
    rows, col = [], repo.label_columns[0]
    for p, cls, i in class_schedule(ctx, list(repo.classes), n_per_class, 1, 1):
        arr = us_frames(ctx.patient_rng(p), ctx.rng(i), cls)
        rel = f"{ctx.patient_id(p)}/US_{i:05d}.dcm"
        ds = dio.new_dataset(
            ctx,
            p,
            dio.US_MULTIFRAME,
            ctx.uid("sop", i),
            "US",
            ctx.uid("series", p),
            ImageType=["ORIGINAL", "PRIMARY"],
            BodyPartExamined="BREAST",
            InstanceNumber=1,
            FrameTime=66.7,
            CineRate=15,
            FrameIncrementPointer=0x00181063,
            TransducerType="LINEAR",
            SeriesDescription="BREAST US CINE",
        )
        dio.set_pixels(ds, arr, "MONOCHROME2")
        dio.save(ds, ctx.path(rel))
        rows.append({repo.path_column: rel, repo.patient_column: ctx.patient_id(p), col: cls})
    n = len(rows)
    return GenResult(rows, files=n, frames=n * US_FRAMES)
