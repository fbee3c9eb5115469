"""Surgical video-frame phantoms: laparoscopic cholecystectomy (JPEG) and
robot-assisted radical prostatectomy (PNG).

Each phase/action has its own large, distinctive scene element (fat-covered
field, dissected ducts with cautery haze, metal clips, white retrieval bag,
bloody liver bed; scissors on a suture, free/held/embedded needle). Every
video (= patient) contributes frames of every class, as in Cholec80/SAR-RARP50,
with a per-video tissue palette so a patient-level split matters.
"""

from __future__ import annotations

import numpy as np

from . import draw as D
from .common import GenContext, GenResult, save_jpeg, save_png

HW = (180, 320)
STEEL = np.array([185, 190, 198], np.float32)


def tissue(rng: np.random.Generator, prng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Wet pink-red tissue field with per-video tint and specular glints."""
    tint = prng.normal(0, 12, 3).astype(np.float32)
    img = np.array([190, 95, 85], np.float32) + tint + 22 * D.smooth_noise(rng, h, w, 25)[..., None] * [1, 0.6, 0.5]
    img += 8 * D.smooth_noise(rng, h, w, 4)[..., None]
    return img


def glints(rng, img, n: int = 25):
    h, w = img.shape[:2]
    return D.compose(img, D.dots(rng, h, w, n, 1.3), [255, 250, 245])


def shaft(rng: np.random.Generator, h: int, w: int, entry, tip, width: float) -> np.ndarray:
    """Instrument shaft from an edge point to the tip (anti-aliased mask)."""
    (x0, y0), (x1, y1) = entry, tip
    return D.polyline_mask(h, w, [np.array([[x0, y0], [x1, y1]])], [width])


def jaws(h: int, w: int, tip, ang: float, length: float, opening: float, width: float = 3.5) -> np.ndarray:
    x, y = tip
    paths = [
        np.array([[x, y], [x + length * np.cos(ang + s * opening), y + length * np.sin(ang + s * opening)]])
        for s in (-1, 1)
    ]
    return D.polyline_mask(h, w, paths, [width, width])


def instrument(rng, img, entry, tip, width, color, jaw_open=0.25, jaw_len=16.0):
    h, w = img.shape[:2]
    ang = np.arctan2(tip[1] - entry[1], tip[0] - entry[0])
    m = shaft(rng, h, w, entry, tip, width)
    img = D.compose(img, m, color)
    img = D.compose(img, shaft(rng, h, w, entry, tip, width * 0.25) * 0.6, [235, 235, 240])  # highlight
    img = D.compose(img, jaws(h, w, tip, ang, jaw_len, jaw_open, max(3.5, width * 0.3)), STEEL)
    return img, ang


def edge_point(rng, h, w, side: str):
    if side == "left":
        return (-5.0, rng.uniform(0.2, 0.9) * h)
    if side == "right":
        return (w + 5.0, rng.uniform(0.2, 0.9) * h)
    return (rng.uniform(0.2, 0.8) * w, -5.0)


def tubes(rng, img, n: int, colors):
    h, w = img.shape[:2]
    paths = []
    for k in range(n):
        p = D.random_walk(
            rng, rng.uniform(0.3, 0.5) * w, rng.uniform(0.25, 0.45) * h + 22 * k, rng.uniform(-0.3, 0.3), 12, 12, 0.05
        )
        img = D.compose(img, D.polyline_mask(h, w, [p], [9.0]), colors[k % len(colors)])
        img = D.compose(img, D.polyline_mask(h, w, [p + [0, -2]], [2.0]) * 0.5, [250, 240, 230])
        paths.append(p)
    return img, paths


def cholec_frame(prng: np.random.Generator, rng: np.random.Generator, phase: str) -> np.ndarray:
    h, w = HW
    img = tissue(rng, prng, h, w)
    liver = np.clip(D.smooth_noise(rng, h, w, 40) * 0.6 + 0.9 - np.linspace(0, 2.2, h)[:, None], 0, 1)
    img = D.compose(img, liver, [115, 38, 35])  # liver at the top
    gb = D.blob(
        h,
        w,
        rng.uniform(0.35, 0.55) * h,
        rng.uniform(0.35, 0.65) * w,
        rng.uniform(30, 45),
        rng,
        0.15,
        aspect=0.6,
        angle=rng.uniform(-0.5, 0.5),
    )
    if phase == "Preparation":  # gallbladder hidden under adhesions / omental fat
        img = D.compose(img, gb, [150, 160, 120])
        fat = np.clip(D.smooth_noise(rng, h, w, 20, octaves=2) + 0.6, 0, 1) * np.linspace(0.3, 1.0, h)[:, None]
        img = D.compose(img, fat, np.array([230, 195, 105], np.float32) + 15 * D.smooth_noise(rng, h, w, 5)[..., None])
        img, _ = instrument(
            rng,
            img,
            edge_point(rng, h, w, "left"),
            (rng.uniform(110, 170), rng.uniform(70, 120)),
            9,
            [70, 72, 78],
            0.15,
        )
    elif phase == "CalotTriangleDissection":  # exposed cystic duct/artery, hook, cautery smoke
        img = D.compose(img, gb, [160, 170, 130])
        img = D.compose(img, D.blur(D.dots(rng, h, w, 40, 3.0), 2) * 0.8, [235, 215, 170])
        img, paths = tubes(rng, img, 2, ([225, 215, 180], [185, 60, 55]))
        tip = paths[0][6] + rng.uniform(-8, 8, 2)
        img, ang = instrument(rng, img, edge_point(rng, h, w, "right"), tip, 8, [40, 40, 45], 0.0, 4.0)
        hook = D.polyline_mask(
            h,
            w,
            [
                np.array(
                    [
                        tip,
                        tip + 10 * np.array([np.cos(ang), np.sin(ang)]),
                        tip + 10 * np.array([np.cos(ang), np.sin(ang)]) + [0, 8],
                    ]
                )
            ],
            [3.0],
        )
        img = D.compose(img, hook, STEEL)
        img = D.compose(img, D.ellipse(h, w, tip[1], tip[0], 30, 45, soft=25) * 0.55, [235, 232, 228])
    elif phase == "ClippingCutting":  # metal clips across the duct, clip applier
        img = D.compose(img, gb, [160, 170, 130])
        img, paths = tubes(rng, img, 1, ([225, 215, 180],))
        p = paths[0]
        for j in sorted(rng.choice(np.arange(3, 10), 3, replace=False)):
            d = p[j + 1] - p[j]
            nrm = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-6)
            clip = D.polyline_mask(h, w, [np.array([p[j] - 9 * nrm, p[j] + 9 * nrm])], [4.0])
            img = D.compose(img, clip, [235, 238, 245])
        img, _ = instrument(rng, img, edge_point(rng, h, w, "top"), p[11] + [0, -6], 12, [150, 155, 165], 0.35, 20)
    elif phase == "GallbladderPackaging":  # specimen inside a white retrieval bag
        bag = D.blob(
            h, w, rng.uniform(0.5, 0.7) * h, rng.uniform(0.35, 0.65) * w, rng.uniform(55, 70), rng, 0.2, aspect=0.75
        )
        folds = 0.85 + 0.15 * np.sin(D.smooth_noise(rng, h, w, 15) * 6)
        img = D.compose(img, bag, np.array([225, 228, 232], np.float32) * folds[..., None])
        img = D.compose(img, gb * bag * 0.6, [140, 155, 120])
        img, _ = instrument(
            rng, img, edge_point(rng, h, w, "left"), (rng.uniform(120, 200), rng.uniform(50, 90)), 9, [70, 72, 78], 0.2
        )
    else:  # CleaningCoagulation: raw liver bed, blood, suction-irrigation cannula
        bed = D.blob(
            h, w, rng.uniform(0.3, 0.5) * h, rng.uniform(0.35, 0.65) * w, rng.uniform(45, 60), rng, 0.25, aspect=0.6
        )
        img = D.compose(img, bed, [95, 18, 15])
        img = D.compose(img, D.dots(rng, h, w, 25, 2.5, weight=bed), [35, 20, 15])  # coagulated spots
        blood = np.clip(D.smooth_noise(rng, h, w, 18) - 0.5, 0, 1) * 2
        img = D.compose(img, np.clip(blood, 0, 1), [110, 10, 10])
        img, _ = instrument(
            rng,
            img,
            edge_point(rng, h, w, "right"),
            (rng.uniform(110, 190), rng.uniform(60, 130)),
            6,
            [200, 200, 205],
            0.0,
            2.0,
        )
        img = glints(rng, img, 60)
    img = glints(rng, img, 20)
    img *= D.vignette(h, w, 0.8, 0.9)[..., None] * prng.uniform(0.85, 1.1)
    return D.to_u8(img + 2.5 * rng.standard_normal((h, w, 1)).astype(np.float32))


def video_schedule(classes: list[str], n_per_class: int, per_video: int = 1):
    """Every video has `per_video` frames of every class (as in real surgeries)."""
    n_videos = max(2, int(np.ceil(n_per_class / per_video)))
    i = 0
    for v in range(n_videos):
        for c in classes:
            for _ in range(per_video):
                yield v, c, i
                i += 1


def cholec(ctx: GenContext, repo, n_per_class: int) -> GenResult:
    rows, col = [], repo.label_columns[0]
    for v, cls, i in video_schedule(list(repo.classes), n_per_class):
        rel = f"videos/video{v + 1:02d}/video{v + 1:02d}_{i * 25:06d}.jpg"
        save_jpeg(cholec_frame(ctx.patient_rng(v), ctx.rng(i), cls), ctx.path(rel))
        rows.append(
            {
                repo.path_column: rel,
                "video_id": f"video{v + 1:02d}",
                "frame": i * 25,
                repo.patient_column: ctx.patient_id(v),
                col: cls,
            }
        )
    return GenResult(rows, files=len(rows), frames=len(rows))


# --------------------------------------------------------- prostatectomy
def arc(cx, cy, r, a0, a1, n=24):
    t = np.linspace(a0, a1, n)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def rarp_frame(prng: np.random.Generator, rng: np.random.Generator, action: str) -> np.ndarray:
    h, w = HW
    img = tissue(rng, prng, h, w)
    hy, hx = rng.uniform(0.55, 0.75) * h, rng.uniform(0.4, 0.6) * w  # urethral stump / anastomosis
    img = D.compose(img, D.ellipse(h, w, hy, hx, 18, 28, soft=6), [90, 25, 30])
    img = D.compose(img, D.ellipse(h, w, hy, hx, 7, 12, soft=3), [35, 10, 12])
    nr = rng.uniform(18, 26)
    ncx, ncy = hx + rng.uniform(-40, 40), hy - rng.uniform(5, 25)
    a0 = rng.uniform(0, 2 * np.pi)
    thread_col, needle_w = [120, 70, 160], 3.4
    left, right = edge_point(rng, h, w, "left"), edge_point(rng, h, w, "right")
    if action == "cutting_suture":  # scissors closing on a taut violet thread
        cut = np.array([hx + rng.uniform(-30, 30), hy - rng.uniform(25, 45)])
        thread = np.array([[hx, hy - 10], cut, cut + [rng.uniform(-60, -30), -rng.uniform(30, 50)]])
        img = D.compose(img, D.polyline_mask(h, w, [thread], [2.2]), thread_col)
        img, ang = instrument(rng, img, right, cut + [14, -6], 20, [30, 30, 34], 0.0, 1.0)
        img = D.compose(img, jaws(h, w, cut + [14, -6], ang, 26, 0.45, 5.0), [215, 215, 220])
        img, _ = instrument(rng, img, left, thread[2], 20, [30, 30, 34], 0.05)
    elif action == "picking_needle":  # needle lying free on tissue, open jaws approaching
        needle = arc(ncx, ncy, nr, a0, a0 + 1.4 * np.pi)
        img = D.compose(img, D.polyline_mask(h, w, [needle], [needle_w]), STEEL)
        img = D.compose(
            img, D.polyline_mask(h, w, [np.vstack([needle[:1], needle[:1] + [-40, 25]])], [2.0]), thread_col
        )
        tip = np.array([ncx + nr + rng.uniform(10, 22), ncy - rng.uniform(0, nr)])  # beside it, entry side
        img, _ = instrument(rng, img, right, tip, 20, [30, 30, 34], 0.6, 24)
    elif action == "positioning_needle":  # needle held in driver, tip touching tissue edge
        needle = arc(hx + rng.uniform(-10, 10), hy - 14 - nr, nr, 0.0, np.pi * 1.3)
        img = D.compose(img, D.polyline_mask(h, w, [needle], [needle_w]), STEEL)
        grip = needle[-4]
        img, _ = instrument(rng, img, left if rng.random() < 0.5 else right, grip, 20, [30, 30, 34], 0.02, 20)
        img = D.compose(
            img, D.polyline_mask(h, w, [np.vstack([needle[-1:], needle[-1:] + [0, -40]])], [2.0]), thread_col
        )
    else:  # pushing_needle: half the arc buried in puckered tissue, thread trailing
        cy = hy - 4
        needle = arc(hx + rng.uniform(-10, 10), cy, nr, np.pi, 2 * np.pi)  # upper half visible
        pucker = D.ellipse(h, w, cy, needle[:, 0].mean(), 6, nr * 1.4, soft=4)
        img = D.compose(img, pucker * 0.6, [130, 40, 45])
        img = D.compose(img, D.polyline_mask(h, w, [needle], [needle_w]), STEEL)
        grip = needle[-5]
        img, _ = instrument(rng, img, right, grip, 20, [30, 30, 34], 0.02, 20)
        trail = np.vstack([needle[:1], needle[:1] + [rng.uniform(-70, -40), rng.uniform(-60, -20)]])
        img = D.compose(img, D.polyline_mask(h, w, [trail], [2.0]), thread_col)
    img = glints(rng, img, 30)
    img *= D.vignette(h, w, 0.5, 1.0)[..., None] * prng.uniform(0.85, 1.1)
    return D.to_u8(img + 2.0 * rng.standard_normal((h, w, 1)).astype(np.float32))


def prostatectomy(ctx: GenContext, repo, n_per_class: int) -> GenResult:
    rows, col = [], repo.label_columns[0]
    for v, cls, i in video_schedule(list(repo.classes), n_per_class):
        rel = f"video_{v + 1:02d}/frames/{i * 60:09d}.png"
        save_png(rarp_frame(ctx.patient_rng(v), ctx.rng(i), cls), ctx.path(rel))
        rows.append(
            {repo.path_column: rel, "video_id": f"video_{v + 1:02d}", repo.patient_column: ctx.patient_id(v), col: cls}
        )
    return GenResult(rows, files=len(rows), frames=len(rows))


def rarp_other_frame(prng: np.random.Generator, rng: np.random.Generator) -> np.ndarray:
    """SAR-RARP50's action 0 ("Other"): the anastomosis with no needle or instrument in view (the camera
    moving between throws). Its frames are left out by the catalog, so it only has to be a plausible scene."""
    h, w = HW
    img = tissue(rng, prng, h, w)
    hy, hx = rng.uniform(0.55, 0.75) * h, rng.uniform(0.4, 0.6) * w
    img = D.compose(img, D.ellipse(h, w, hy, hx, 18, 28, soft=6), [90, 25, 30])
    img = D.compose(img, D.ellipse(h, w, hy, hx, 7, 12, soft=3), [35, 10, 12])
    img = glints(rng, img, 30)
    img *= D.vignette(h, w, 0.5, 1.0)[..., None] * prng.uniform(0.85, 1.1)
    return D.to_u8(img + 2.0 * rng.standard_normal((h, w, 1)).astype(np.float32))
