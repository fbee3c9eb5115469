"""Gastroenterology phantoms: Kvasir-style GI endoscopy JPEGs in class folders.

Polyps are raised, shaded pink bulges; esophagitis shows pale squamous
mucosa with red radial erosions around a dark lumen; ulcerative colitis is
diffusely red and granular with fibrin spots; dyed-lifted polyps are large
indigo-blue submucosal lifts. The green scope-position inset that real Kvasir
images carry appears at random in every class (a shortcut that must not help).
"""

from __future__ import annotations

import numpy as np

from . import draw as D
from .common import GenContext, GenResult, class_schedule, save_jpeg

HW = (200, 250)
MUCOSA = np.array([215, 125, 100], np.float32)


def scope_frame(h: int, w: int) -> np.ndarray:
    """Rounded-octagon field of view of an endoscope video frame."""
    yy, xx = D.grid(h, w)
    u, v = np.abs(xx - w / 2) / (w / 2), np.abs(yy - h / 2) / (h / 2)
    inside = (np.maximum(u, v) < 0.97) & (u + v < 1.55)
    return D.blur(inside.astype(np.float32), 0.8)


def lumen_scene(rng: np.random.Generator, prng: np.random.Generator, h: int, w: int, base: np.ndarray):
    """Mucosa with haustral folds, a dark lumen and lighting fall-off."""
    yy, xx = D.grid(h, w)
    ly, lx = h / 2 + rng.uniform(-50, 50), w / 2 + rng.uniform(-70, 70)
    r = np.sqrt((yy - ly) ** 2 + (xx - lx) ** 2)
    folds = 0.5 + 0.5 * np.sin(r / rng.uniform(7, 11) + 1.5 * D.smooth_noise(rng, h, w, 30))
    img = base + prng.normal(0, 10, 3).astype(np.float32) + 12 * D.smooth_noise(rng, h, w, 12)[..., None]
    img = img * (0.8 + 0.25 * folds[..., None])
    light = np.clip(r / (0.55 * max(h, w)), 0.1, 1.0) ** 0.6
    return img * light[..., None], (ly, lx)


def kvasir_image(prng: np.random.Generator, rng: np.random.Generator, cls: str) -> np.ndarray:
    h, w = HW
    yy, xx = D.grid(h, w)
    base = MUCOSA
    if cls == "ulcerative-colitis":
        base = np.array([185, 55, 45], np.float32)
    elif cls == "esophagitis":
        base = np.array([225, 165, 150], np.float32)
    img, (ly, lx) = lumen_scene(rng, prng, h, w, base)
    if cls in ("polyps", "dyed-lifted-polyps"):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        r = rng.uniform(28, 45) if cls == "polyps" else rng.uniform(40, 60)
        m = D.blob(h, w, cy, cx, r, rng, 0.12, harmonics=3, soft=2.5)
        shade = np.clip(1.15 - 0.5 * ((yy - cy + r * 0.4) ** 2 + (xx - cx + r * 0.3) ** 2) / r**2, 0.55, 1.15)
        if cls == "polyps":  # reddish raised lesion with surface pit pattern
            col = np.array([200, 85, 80], np.float32) * shade[..., None]
            col = col * (1 + 0.06 * D.smooth_noise(rng, h, w, 3)[..., None])
        else:  # indigo-carmine lifted cushion, dye diffusing at the margins
            col = np.array([70, 110, 185], np.float32) * shade[..., None]
            halo = np.clip(D.blur(m, 10) * 1.3, 0, 1)
            img = D.compose(img, halo * 0.6, [95, 120, 175])
        img = D.compose(img, m, col)
        img = D.compose(img, D.dots(rng, h, w, 8, 2.0, weight=m) * 0.9, [255, 255, 255])
    elif cls == "esophagitis":  # red linear erosions radiating to the lumen
        paths = []
        for a in rng.uniform(0, 2 * np.pi, int(rng.integers(6, 11))):
            r0 = rng.uniform(15, 30)
            paths.append(D.random_walk(rng, lx + r0 * np.cos(a), ly + r0 * np.sin(a), a, 8, rng.uniform(6, 10), 0.08))
        ero = D.polyline_mask(h, w, paths, list(rng.uniform(4, 8, len(paths))))
        img = D.compose(img, D.blur(ero, 1.5), [200, 40, 40])
        img = D.compose(img, D.ellipse(h, w, ly, lx, 28, 28, soft=18) * 0.6, [200, 110, 95])  # Z-line
    elif cls == "ulcerative-colitis":  # granular friable mucosa, ulcers with fibrin, bleeding
        img = img * (1 + 0.12 * D.smooth_noise(rng, h, w, 2)[..., None])
        ulc = D.dots(rng, h, w, int(rng.integers(10, 25)), rng.uniform(3, 5))
        img = D.compose(img, ulc, [240, 235, 200])
        img = D.compose(img, D.dots(rng, h, w, 15, 2.5) * 0.8, [120, 10, 10])
    lumen = D.ellipse(h, w, ly, lx, rng.uniform(10, 18), rng.uniform(12, 22), soft=10)
    img = D.compose(img, lumen, [20, 8, 8])
    img = D.compose(img, D.dots(rng, h, w, 20, 1.5), [255, 255, 250])  # specular glints
    img *= scope_frame(h, w)[..., None]
    if rng.random() < 0.4:  # scope-position inset (ScopeGuide) in the lower left corner
        box = np.zeros((h, w), np.float32)
        box[h - 52 : h - 6, 6:62] = 1
        img = D.compose(img, box, [20, 110, 40])
        img = D.compose(
            img, D.polyline_mask(h, w, [D.random_walk(rng, 14, h - 20, -0.5, 8, 5, 0.4)], [2.0]), [120, 220, 120]
        )
    return D.to_u8(img + 2.5 * rng.standard_normal((h, w, 1)).astype(np.float32))


def kvasir(ctx: GenContext, repo, n_per_class: int) -> GenResult:
    rows, col = [], repo.label_columns[0]
    for p, cls, i in class_schedule(ctx, list(repo.classes), n_per_class, 1, 3):
        rel = f"images/{cls}/{ctx.uid('img', i)[-12:]}.jpg"
        save_jpeg(kvasir_image(ctx.patient_rng(p), ctx.rng(i), cls), ctx.path(rel))
        rows.append({repo.path_column: rel, repo.patient_column: ctx.patient_id(p), col: cls})
    return GenResult(rows, files=len(rows), frames=len(rows))
