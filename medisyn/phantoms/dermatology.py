"""Dermatology phantoms: ISIC-style dermoscopy and clinical photographs (JPEG).

Lesion colour, outline and texture carry the class (melanoma: large,
irregular, multi-coloured; nevus: round uniform brown; seborrheic keratosis:
waxy tan with cracks; BCC: pink pearly with arborising vessels). Skin tone,
lighting, the dermatoscope's field of view, hairs and the lesion's size, place
and pigment vary per patient/image, so two patients' lesions of one class are
no near copies of each other (the memorization audit's patch distance tells
them apart; tests/test_phantoms.py).
"""

from __future__ import annotations

import numpy as np

from . import draw as D
from .common import GenContext, GenResult, class_schedule, save_jpeg

DERMO_HW = (225, 300)
PHOTO_HW = (240, 320)

SKIN_TONES = np.array([[236, 196, 170], [224, 172, 140], [200, 150, 115], [170, 120, 90], [240, 205, 185]], np.float32)


def skin(rng: np.random.Generator, h: int, w: int, tone: np.ndarray, mottling: float = 10) -> np.ndarray:
    """Skin background with low-frequency mottling and fine texture."""
    n1 = D.smooth_noise(rng, h, w, 30)[..., None]
    n2 = D.smooth_noise(rng, h, w, 3)[..., None]
    return tone + mottling * n1 + 4 * n2 + np.array([0, -2, -4], np.float32) * n1


def hairs(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    paths = [
        D.random_walk(rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, 2 * np.pi), 20, rng.uniform(4, 9), 0.06)
        for _ in range(n)
    ]
    return D.polyline_mask(h, w, paths, list(rng.uniform(1.0, 2.0, n)))


def dermoscopy_image(prng: np.random.Generator, rng: np.random.Generator, dx: str) -> np.ndarray:
    h, w = DERMO_HW
    t = prng.choice(len(SKIN_TONES), 2, replace=False)
    tone = SKIN_TONES[t[0]] + prng.uniform(0, 1) * (SKIN_TONES[t[1]] - SKIN_TONES[t[0]]) + prng.normal(0, 6, 3)
    img = skin(rng, h, w, tone)
    cy, cx = h / 2 + rng.uniform(-40, 40), w / 2 + rng.uniform(-40, 40)
    ang = rng.uniform(0, np.pi)
    size = rng.uniform(0.75, 1.3)  # lesions are photographed at several sizes
    if dx == "MEL":  # large, asymmetric, irregular border, several colours
        r = rng.uniform(55, 75) * size
        les = D.blob(h, w, cy, cx, r, rng, 0.35, harmonics=7, aspect=rng.uniform(0.7, 1.0), angle=ang, soft=2)
        img = D.compose(img, les, [95, 55, 40])
        for col in ([35, 22, 25], [70, 80, 110], [150, 60, 60], [40, 30, 30]):
            patch = np.clip(D.smooth_noise(rng, h, w, 18) - 0.3, 0, 1) * les
            img = D.compose(img, np.clip(patch * 1.6, 0, 1), col)
        veil = D.blob(h, w, cy + rng.uniform(-20, 20), cx + rng.uniform(-20, 20), r * 0.4, rng, 0.3) * les
        img = D.compose(img, veil * 0.7, [110, 130, 160])  # blue-white veil
    elif dx == "NV":  # small/medium, round, uniform brown with faint network
        r = rng.uniform(32, 48) * size
        les = D.ellipse(h, w, cy, cx, r, r * rng.uniform(0.9, 1.1), ang, soft=4)
        yy, xx = D.grid(h, w)
        warp = 2.5 * D.smooth_noise(rng, h, w, 12)
        net = (np.sin(xx / 2.5 + warp) * np.sin(yy / 2.5 - warp) > 0.3).astype(np.float32) * 0.25
        img = D.compose(img, les, np.array([120, 72, 45], np.float32) * (1 - net[..., None] * les[..., None]))
    elif dx == "SK":  # waxy tan/light-brown plaque with cracks and milia-like cysts
        r = rng.uniform(45, 65) * size
        les = D.blob(h, w, cy, cx, r, rng, 0.12, harmonics=3, aspect=rng.uniform(0.7, 0.9), angle=ang, soft=2)
        img = D.compose(img, les, np.array([175, 135, 85], np.float32) + 18 * D.smooth_noise(rng, h, w, 6)[..., None])
        paths = [
            D.random_walk(
                rng, cx + rng.uniform(-r, r) * 0.6, cy + rng.uniform(-r, r) * 0.6, rng.uniform(0, 2 * np.pi), 10, 4, 0.4
            )
            for _ in range(14)
        ]
        cracks = D.polyline_mask(h, w, paths, [2.0] * 14) * les
        img = D.compose(img, cracks, [85, 60, 40])
        img = D.compose(img, D.dots(rng, h, w, 16, 2.2, weight=les), [245, 240, 225])
    else:  # BCC: pink pearly translucent nodule, arborising vessels, blue-grey ovoid nests
        r = rng.uniform(40, 58) * size
        les = D.ellipse(h, w, cy, cx, r, r * rng.uniform(0.8, 1.1), ang, soft=10)
        img = D.compose(img, les * 0.9, [235, 165, 170])
        paths, widths = [], []
        for a in rng.uniform(0, 2 * np.pi, 4):
            p, wd = D.branching(
                rng, cx + np.cos(a) * r * 0.8, cy + np.sin(a) * r * 0.8, a + np.pi, r * 0.9, 2.6, 2, 0.3
            )
            paths += p
            widths += wd
        img = D.compose(img, D.polyline_mask(h, w, paths, widths) * les, [190, 30, 45])
        img = D.compose(img, D.dots(rng, h, w, 5, 5, weight=les) * 0.8, [80, 90, 115])
    # pigment varies between lesions of one class and across each lesion (darker and lighter lobes)
    pigment = rng.uniform(0.75, 1.2) * (1 + 0.2 * D.smooth_noise(rng, h, w, 20))[..., None] * rng.normal(1, 0.04, 3)
    img *= 1 + les[..., None] * (pigment - 1)
    img = D.compose(img, hairs(rng, h, w, int(rng.integers(0, 6))), [45, 35, 30])
    yy, xx = D.grid(h, w)  # dermatoscope's circular field of view, its size and the light vary per image
    fov = rng.uniform(0.5, 0.8)
    rr = np.sqrt(((yy - h / 2) / (h * fov)) ** 2 + ((xx - w / 2) / (w * fov)) ** 2)
    img *= np.clip((1.08 - rr) * 5, 0, 1)[..., None] * rng.uniform(0.8, 1.1) * rng.normal(1, 0.03, 3)
    return D.to_u8(img)


def isic(ctx: GenContext, repo, n_per_class: int) -> GenResult:
    rows = []
    for p, cls, i in class_schedule(ctx, list(repo.classes), n_per_class, 1, 3):
        rows.append(isic_write(ctx, repo, p, i, cls, dermoscopy_image(ctx.patient_rng(p), ctx.rng(i), cls)))
    return GenResult(rows, files=len(rows), frames=len(rows))


def isic_id(i: int) -> str:
    return f"ISIC_{24306 + 7 * i:07d}"


def isic_row(ctx, repo, p: int, i: int, label: str) -> dict:
    """ISIC-style metadata row; the image lives at images/<isic_id>.jpg."""
    iid = isic_id(i)
    return {
        "isic_id": iid,
        repo.path_column: f"images/{iid}.jpg",
        repo.patient_column: ctx.patient_id(p),
        "anatom_site_general": ["torso", "lower extremity", "upper extremity", "head/neck"][p % 4],
        repo.label_columns[0]: label,
    }


def isic_write(ctx, repo, p: int, i: int, label: str, arr: np.ndarray) -> dict:
    row = isic_row(ctx, repo, p, i, label)
    save_jpeg(arr, ctx.path(row[repo.path_column]))
    return row


# ------------------------------------------------------- clinical photos
def clinical_image(prng: np.random.Generator, rng: np.random.Generator, cond: str) -> np.ndarray:
    """Photo of a skin surface (limb/face) under uneven light on a backdrop."""
    h, w = PHOTO_HW
    tone = SKIN_TONES[int(prng.integers(0, len(SKIN_TONES)))] + prng.normal(0, 8, 3)
    img = skin(rng, h, w, tone, mottling=8)
    yy, xx = D.grid(h, w)
    # body part edge: backdrop occupies one side
    ang = rng.uniform(0, 2 * np.pi)
    edge = (np.cos(ang) * (xx - w / 2) + np.sin(ang) * (yy - h / 2)) / 4 - rng.uniform(28, 40)
    body = np.clip(0.5 - edge + 2 * D.smooth_noise(rng, h, w, 40), 0, 1)
    if cond == "psoriasis":  # sharply demarcated salmon-red plaques with silvery scale
        plaques = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(2, 4))):
            plaques = np.maximum(
                plaques,
                D.blob(
                    h, w, rng.uniform(40, h - 40), rng.uniform(50, w - 50), rng.uniform(25, 45), rng, 0.25, soft=1.5
                ),
            )
        img = D.compose(img, plaques, [205, 85, 80])
        scale = np.clip(D.smooth_noise(rng, h, w, 4) * 0.8 + 0.2, 0, 1) * plaques
        img = D.compose(img, scale * 0.85, [232, 228, 222])
    elif cond == "eczema":  # ill-defined, diffuse erythema, papules and excoriations
        field = np.clip(D.smooth_noise(rng, h, w, 25, octaves=2) * 0.7 + 0.3, 0, 1)
        img = D.compose(img, field * 0.75, [200, 105, 100])
        img = D.compose(img, D.dots(rng, h, w, 120, 1.8, weight=field) * 0.6, [175, 70, 70])
        paths = [
            D.random_walk(rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, np.pi), 6, 5, 0.1)
            for _ in range(10)
        ]
        img = D.compose(img, D.polyline_mask(h, w, paths, [1.5] * 10) * field, [150, 45, 50])
    else:  # acne: many small inflamed papules, some with white/yellow pustule heads
        pap = D.dots(rng, h, w, int(rng.integers(30, 55)), 4.5)
        img = D.compose(img, D.blur(pap, 2.5) * 0.8, [200, 80, 75])
        img = D.compose(img, pap, [190, 60, 60])
        heads = D.dots(rng, h, w, int(rng.integers(10, 20)), 1.7, weight=pap)
        img = D.compose(img, heads, [245, 235, 190])
    light = 1 + 0.18 * np.cos(ang + 1.0) * (xx - w / 2) / w + 0.1 * D.smooth_noise(rng, h, w, 80)
    img = img * light[..., None]
    backdrop = np.array([70, 90, 120], np.float32) + prng.normal(0, 20, 3)
    img = D.compose(img, 1 - body, backdrop + 6 * D.smooth_noise(rng, h, w, 20)[..., None])
    return D.to_u8(img + 2.5 * rng.standard_normal((h, w, 3)).astype(np.float32))


def derm_photos(ctx: GenContext, repo, n_per_class: int) -> GenResult:
    rows, col = [], repo.label_columns[0]
    for p, cls, i in class_schedule(ctx, list(repo.classes), n_per_class, 2, 3):
        rel = f"{cls}/{ctx.patient_id(p)}_{i:04d}.jpg"
        save_jpeg(clinical_image(ctx.patient_rng(p), ctx.rng(i), cls), ctx.path(rel))
        rows.append({repo.path_column: rel, repo.patient_column: ctx.patient_id(p), col: cls})
    return GenResult(rows, files=len(rows), frames=len(rows))


# ------------------------------------------- clinical photos of neoplasms (Fitzpatrick17k's benign / malignant)
def clinical_lesion_image(prng: np.random.Generator, rng: np.random.Generator, kind: str) -> np.ndarray:
    """Photo of one skin lesion on the same skin, light and backdrop as `clinical_image`.

    benign: small, round, smooth-bordered, one even colour (a nevus, dermatofibroma or keratosis seen
    from afar); malignant: larger, asymmetric and irregular, several colours (black, brown, red, blue-grey)
    with a crusted centre, so the three-partition classes differ as melanoma vs nevus do in dermoscopy.
    """
    h, w = PHOTO_HW
    tone = SKIN_TONES[int(prng.integers(0, len(SKIN_TONES)))] + prng.normal(0, 8, 3)
    img = skin(rng, h, w, tone, mottling=8)
    yy, xx = D.grid(h, w)
    ang = rng.uniform(0, 2 * np.pi)
    edge = (np.cos(ang) * (xx - w / 2) + np.sin(ang) * (yy - h / 2)) / 4 - rng.uniform(28, 40)
    body = np.clip(0.5 - edge + 2 * D.smooth_noise(rng, h, w, 40), 0, 1)
    # the lesion sits on skin: pull its centre away from the backdrop side
    cy = h / 2 - np.sin(ang) * rng.uniform(20, 45) + rng.uniform(-20, 20)
    cx = w / 2 - np.cos(ang) * rng.uniform(20, 60) + rng.uniform(-25, 25)
    if kind == "benign":
        r = rng.uniform(18, 26)
        les = D.ellipse(h, w, cy, cx, r, r * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi), soft=2.5)
        colour = [[150, 100, 70], [120, 78, 55], [205, 140, 125]][int(prng.integers(0, 3))]
        img = D.compose(img, les, np.array(colour, np.float32) * rng.uniform(0.92, 1.08))
        glint = D.ellipse(h, w, cy - r * 0.35, cx - r * 0.3, r * 0.25, r * 0.35, soft=3) * les
        img = D.compose(img, glint * 0.25, [250, 240, 230])  # a smooth dome catches the light
    else:
        r = rng.uniform(34, 48)
        les = D.blob(h, w, cy, cx, r, rng, 0.4, harmonics=7, aspect=rng.uniform(0.65, 0.95), angle=ang, soft=2)
        img = D.compose(img, les, [105, 60, 45])
        for col in ([30, 20, 22], [160, 50, 50], [75, 85, 115], [60, 35, 28]):
            patch = np.clip(D.smooth_noise(rng, h, w, 14) - 0.25, 0, 1) * les
            img = D.compose(img, np.clip(patch * 1.8, 0, 1), col)
        crust = D.blob(h, w, cy + rng.uniform(-8, 8), cx + rng.uniform(-8, 8), r * 0.35, rng, 0.35) * les
        img = D.compose(img, crust * 0.8, [170, 120, 70])  # ulcerated, crusted centre
        img = D.compose(img, D.dots(rng, h, w, 12, 2.5, weight=les) * 0.7, [25, 15, 15])  # satellite nodules
    light = 1 + 0.18 * np.cos(ang + 1.0) * (xx - w / 2) / w + 0.1 * D.smooth_noise(rng, h, w, 80)
    img = img * light[..., None]
    backdrop = np.array([70, 90, 120], np.float32) + prng.normal(0, 20, 3)
    img = D.compose(img, 1 - body, backdrop + 6 * D.smooth_noise(rng, h, w, 20)[..., None])
    return D.to_u8(img + 2.5 * rng.standard_normal((h, w, 3)).astype(np.float32))
