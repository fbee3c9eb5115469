"""Ophthalmology phantoms: retinal OCT B-scans (8-bit PNG) and colour fundus
photographs (JPEG).

OCT: layered retina with a foveal pit; drusen lift the RPE in small domes,
CNV is a large hyper-reflective sub-retinal lesion with fluid, DME thickens
the retina with dark cystoid spaces. Fundus: optic disc, vessel arcades and
macula on an orange-red field; glaucoma enlarges the pale cup, diabetic
retinopathy adds haemorrhages, exudates and cotton-wool spots.
"""

from __future__ import annotations

import numpy as np

from . import draw as D
from .common import GenContext, GenResult, class_schedule, save_jpeg, save_png

OCT_HW = (192, 256)
FUNDUS = 256

# (fractional depth of lower boundary between ILM and RPE, reflectivity)
LAYERS = (
    (0.10, 0.85),
    (0.34, 0.50),
    (0.44, 0.22),
    (0.52, 0.50),
    (0.80, 0.16),
    (0.83, 0.45),
    (0.88, 0.20),
    (0.93, 0.85),
    (1.00, 1.00),
)


def oct_image(prng: np.random.Generator, rng: np.random.Generator, cls: str) -> np.ndarray:
    h, w = OCT_HW
    yy, xx = D.grid(h, w)
    x = xx[0]
    fx = w / 2 + rng.uniform(-30, 30)
    base = rng.uniform(70, 105) + rng.uniform(-0.12, 0.12) * (x - w / 2)
    curve = prng.uniform(0.0003, 0.0012) * (x - fx) ** 2
    thick = prng.uniform(44, 52) * np.ones_like(x)
    pit = rng.uniform(18, 24) * np.exp(-(((x - fx) / rng.uniform(14, 20)) ** 2))
    rpe = base + curve + thick / 2
    if cls == "DME":  # thickened retina, pit lost
        swell = rng.uniform(18, 30) * np.exp(-(((x - fx) / rng.uniform(35, 55)) ** 2))
        ilm = rpe - thick - swell + pit * 0.1
    else:
        ilm = rpe - thick + pit
    bruch = rpe.copy()
    if cls == "DRUSEN":  # several dome-shaped RPE elevations
        for _ in range(int(rng.integers(3, 7))):
            c = fx + rng.uniform(-70, 70)
            rpe = rpe - rng.uniform(6, 13) * np.exp(-(((x - c) / rng.uniform(6, 12)) ** 2))
    elif cls == "CNV":  # large fibrovascular PED lifting the retina
        c = fx + rng.uniform(-15, 15)
        bump = rng.uniform(20, 32) * np.exp(-((np.abs(x - c) / rng.uniform(22, 34)) ** 1.6))
        rpe, ilm = rpe - bump, ilm - bump * 1.4
    f = (yy - ilm[None, :]) / np.maximum(rpe - ilm, 4)[None, :]
    img = np.full((h, w), 0.04, np.float32)
    lower_prev = 0.0
    for lower, refl in LAYERS:
        img = np.where((f >= lower_prev) & (f < lower), refl, img)
        lower_prev = lower
    below = yy >= rpe[None, :]
    chor = 0.45 * np.exp(-(yy - bruch[None, :]) / 45) * (0.8 + 0.4 * D.smooth_noise(rng, h, w, 5))
    img = np.where(below & (yy >= bruch[None, :] + 3), chor, img)
    img = np.where(below & (yy < bruch[None, :] + 3), 0.95, img)  # RPE / Bruch complex
    if cls == "DRUSEN":
        img = np.where((yy >= rpe[None, :] + 3) & (yy < bruch[None, :]), 0.5, img)
    elif cls == "CNV":
        les = (yy >= rpe[None, :] + 2) & (yy < bruch[None, :])
        img = np.where(les, 0.75 + 0.2 * D.smooth_noise(rng, h, w, 3), img)
        fluid = D.ellipse(h, w, float(rpe[int(c)]) - 9, c, 7, rng.uniform(18, 28), soft=2)
        img = D.compose(img, fluid * (f > 0.55), 0.03)
    elif cls == "DME":  # cystoid spaces in inner/outer nuclear layers
        for _ in range(int(rng.integers(5, 10))):
            cx = fx + rng.uniform(-45, 45)
            j = int(np.clip(cx, 0, w - 1))
            cy = ilm[j] + rng.uniform(0.35, 0.75) * (rpe[j] - ilm[j])
            img = D.compose(img, D.ellipse(h, w, cy, cx, rng.uniform(4, 8), rng.uniform(4, 10), soft=1.5), 0.03)
        img = D.compose(img, D.dots(rng, h, w, 25, 1.2, weight=((f > 0.1) & (f < 0.8)).astype(np.float32)), 0.9)
    img = D.blur(img, 0.8)
    speckle = D.blur(rng.gamma(2.0, 0.5, (h, w)).astype(np.float32), 0.6)
    img = img * speckle * prng.uniform(0.85, 1.1) + 0.04 * rng.standard_normal((h, w)).astype(np.float32)
    return D.to_u8(np.clip(img, 0, 1) ** 0.8 * 255)


def oct_repo(ctx: GenContext, repo, n_per_class: int) -> GenResult:
    rows, col = [], repo.label_columns[0]
    for p, cls, i in class_schedule(ctx, list(repo.classes), n_per_class, 2, 4):
        rel = f"train/{cls}/{cls}-{ctx.patient_id(p)}-{i}.png"
        save_png(oct_image(ctx.patient_rng(p), ctx.rng(i), cls), ctx.path(rel))
        rows.append({repo.path_column: rel, repo.patient_column: ctx.patient_id(p), col: cls})
    return GenResult(rows, files=len(rows), frames=len(rows))


# ------------------------------------------------------------------ fundus
def fundus_image(prng: np.random.Generator, rng: np.random.Generator, cls: str) -> np.ndarray:
    n = FUNDUS
    yy, xx = D.grid(n, n)
    right_eye = prng.random() < 0.5
    c = n / 2
    r_fov = n * rng.uniform(0.46, 0.49)
    rr = np.sqrt((yy - c) ** 2 + (xx - c) ** 2) / r_fov
    pig = prng.uniform(0.8, 1.15)
    bg = np.array([205, 88, 38], np.float32) * pig + 10 * D.smooth_noise(rng, n, n, 10)[..., None] * [1, 0.5, 0.2]
    img = bg * (1 - 0.45 * rr[..., None] ** 2)
    dy, dx = rng.uniform(-10, 10), rng.uniform(50, 62) * (1 if right_eye else -1)
    oy, ox = c + dy, c + dx  # optic disc (nasal)
    my, mx = c + rng.uniform(-6, 6), c - dx * 0.35  # macula (temporal)
    img = D.compose(img, D.ellipse(n, n, my, mx, 22, 22, soft=14) * 0.6, [110, 40, 20])
    to_mac = np.arctan2(my - oy, mx - ox)
    paths, widths = [], []
    for a, ln in ((to_mac - 0.85, 110), (to_mac + 0.85, 110), (to_mac + np.pi - 0.6, 70), (to_mac + np.pi + 0.6, 70)):
        p, wd = D.branching(rng, ox, oy, a, ln, 4.0, 2, 0.12)
        paths += p
        widths += wd
    img = D.compose(img, D.polyline_mask(n, n, paths, widths) * 0.85, [125, 25, 18])
    disc_r = rng.uniform(17, 21)
    img = D.compose(img, D.ellipse(n, n, oy, ox, disc_r * 1.08, disc_r, soft=2.5), [240, 175, 110])
    cdr = rng.uniform(0.72, 0.88) if cls == "glaucoma" else rng.uniform(0.2, 0.4)
    cup = D.ellipse(n, n, oy, ox + rng.uniform(-2, 2), disc_r * cdr * 1.1, disc_r * cdr, soft=2)
    img = D.compose(img, cup, [252, 232, 200] if cls == "glaucoma" else [250, 215, 160])
    if cls == "glaucoma":  # peripapillary atrophy crescent
        ring = D.ellipse(n, n, oy, ox, disc_r * 1.35, disc_r * 1.3, soft=3)
        img = D.compose(img, (ring - D.ellipse(n, n, oy, ox, disc_r * 1.08, disc_r)).clip(0, 1) * 0.5, [225, 180, 140])
    if cls == "diabetic_retinopathy":
        fov_w = (rr < 0.85).astype(np.float32)
        hem = D.dots(rng, n, n, int(rng.integers(18, 35)), rng.uniform(2.5, 4.0), weight=fov_w)
        img = D.compose(img, hem, [105, 18, 10])
        mac = D.ellipse(n, n, my, mx, 45, 45, soft=20) * fov_w
        ex = D.dots(rng, n, n, int(rng.integers(30, 70)), 1.8, weight=mac)
        img = D.compose(img, ex, [250, 225, 110])
        cws = D.dots(rng, n, n, int(rng.integers(2, 5)), 7.0, weight=fov_w)
        img = D.compose(img, D.blur(cws, 2) * 0.9, [240, 235, 215])
    img *= rng.uniform(0.85, 1.1)
    img = img * (rr < 1)[..., None] + 3 * rng.standard_normal((n, n, 1)).astype(np.float32)
    return D.to_u8(img)


def fundus(ctx: GenContext, repo, n_per_class: int) -> GenResult:
    rows, col = [], repo.label_columns[0]
    for p, cls, i in class_schedule(ctx, list(repo.classes), n_per_class, 1, 2):
        eye = "right" if ctx.patient_rng(p).random() < 0.5 else "left"
        rel = f"images/{ctx.patient_id(p)}_{eye}_{i:04d}.jpg"
        save_jpeg(fundus_image(ctx.patient_rng(p), ctx.rng(i), cls), ctx.path(rel))
        rows.append({repo.path_column: rel, repo.patient_column: ctx.patient_id(p), col: cls})
    return GenResult(rows, files=len(rows), frames=len(rows))


def fundus_proliferative(prng: np.random.Generator, rng: np.random.Generator) -> np.ndarray:
    """Proliferative diabetic retinopathy (EyePACS level 4): the DR fundus plus what only level 4 has,
    large enough to survive the demo's 128² resize: a boat-shaped pre-retinal haemorrhage (dark red,
    flat-topped where the blood settles) and sea-fan tufts of new vessels with whitish fibrous tissue."""
    img = fundus_image(prng, rng, "diabetic_retinopathy").astype(np.float32)
    n = FUNDUS
    c = n / 2
    yy, xx = D.grid(n, n)
    # pre-retinal haemorrhage below or above the macula, inside the field of view
    a, d = rng.uniform(0, 2 * np.pi), rng.uniform(15, 45)
    hy, hx = c + d * np.sin(a), c + d * np.cos(a)
    ry, rx = rng.uniform(15, 22), rng.uniform(26, 36)
    boat = D.ellipse(n, n, hy, hx, ry, rx, soft=2.5) * np.clip((yy - (hy - ry * 0.25)) / 2, 0, 1)
    img = D.compose(img, boat * 0.95, np.array([115, 12, 8], np.float32) * rng.uniform(0.85, 1.1))
    # neovascular tufts: loops of fine vessels fanning from a point, on a fibrous veil
    for _ in range(int(rng.integers(2, 4))):
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(40, 85)
        ty, tx = c + d * np.sin(a), c + d * np.cos(a)
        veil = D.ellipse(n, n, ty, tx, rng.uniform(12, 18), rng.uniform(12, 18), soft=6)
        img = D.compose(img, veil * 0.45, [235, 205, 185])
        paths = [
            D.random_walk(rng, tx, ty, rng.uniform(0, 2 * np.pi), 10, rng.uniform(1.8, 2.6), 0.55)
            for _ in range(int(rng.integers(10, 16)))
        ]
        img = D.compose(img, D.polyline_mask(n, n, paths, [1.6] * len(paths)) * 0.95, [175, 18, 22])
    return D.to_u8(img)
