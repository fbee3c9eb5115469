"""Planted real-world mess that the ingest stage must survive.

Each planter writes its file(s) inside the repository (matched by the repo's
glob), optionally appends label rows, and returns records for phantoms.json:
{"repo", "path" (relative to OUT), "kind", "detail", "in_labels_csv"}.
"""

from __future__ import annotations

import shutil

from . import dermatology, radiology
from .common import DEFECT_OFFSET, GenContext, GenResult, save_jpeg
from .gastro import kvasir_image


def _rec(ctx: GenContext, rel: str, kind: str, detail: str, in_csv: bool) -> dict:
    return {"repo": ctx.repo, "path": f"{ctx.repo}/{rel}", "kind": kind, "detail": detail, "in_labels_csv": in_csv}


def ctpa(ctx: GenContext, repo, res: GenResult) -> list[dict]:
    """A truncated slice (half its bytes) and a header-only slice without PixelData."""
    out, col = [], repo.label_columns[0]
    for p, kind in ((1, "truncated_dicom"), (0, "dicom_without_pixel_data")):
        a, n_sl, series, pe = radiology.ct_patient(ctx, p)
        rel = f"{ctx.patient_id(p)}/{series}/slice_{n_sl:03d}.dcm"
        path = ctx.path(rel)
        radiology.write_ct_slice(
            ctx,
            p,
            n_sl,
            n_sl + 1,
            a,
            pe,
            series,
            path,
            ctx.rng(DEFECT_OFFSET + p),
            pixels=kind != "dicom_without_pixel_data",
        )
        if kind == "truncated_dicom":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            detail = "valid CT slice cut to half its bytes (PixelData incomplete)"
        else:
            detail = "CT slice with a complete header but no PixelData element"
        res.rows.append({repo.path_column: rel, repo.patient_column: ctx.patient_id(p), col: int(pe)})
        out.append(_rec(ctx, rel, kind, detail, True))
    return out


def isic(ctx: GenContext, repo, res: GenResult) -> list[dict]:
    """An exact byte duplicate under a new id, and a row with an unknown diagnosis."""
    col, n = repo.label_columns[0], len(res.rows)
    src = res.rows[0]
    dup_p = int(src[repo.patient_column][-4:])
    dup = dermatology.isic_row(ctx, repo, dup_p, n, src[col])
    shutil.copyfile(ctx.repo_dir / src[repo.path_column], ctx.path(dup[repo.path_column]))
    res.rows.append(dup)
    last = res.rows[n - 1]
    p = int(last[repo.patient_column][-4:])
    img = dermatology.dermoscopy_image(ctx.patient_rng(p), ctx.rng(DEFECT_OFFSET), "NV")
    unk = dermatology.isic_write(ctx, repo, p, n + 1, "UNK", img)
    res.rows.append(unk)
    return [
        _rec(
            ctx,
            dup[repo.path_column],
            "duplicate_image",
            f"identical bytes to {src[repo.path_column]} (same patient, new id and row)",
            True,
        ),
        _rec(ctx, unk[repo.path_column], "unknown_label", "diagnosis 'UNK' is not a known class", True),
    ]


def oct_repo(ctx: GenContext, repo, res: GenResult) -> list[dict]:
    """A zero-byte PNG that the label CSV lists."""
    src = res.rows[0]
    label = src[repo.label_columns[0]]
    rel = f"train/{label}/{label}-{src[repo.patient_column]}-{len(res.rows)}.png"
    ctx.path(rel).write_bytes(b"")
    res.rows.append({**src, repo.path_column: rel})
    return [_rec(ctx, rel, "empty_file", "zero-byte PNG listed in the label CSV", True)]


def kvasir(ctx: GenContext, repo, res: GenResult) -> list[dict]:
    """An image in a class folder with no label row (orphan file)."""
    cls = next(iter(repo.classes))
    rel = f"images/{cls}/{ctx.uid('orphan')[-12:]}.jpg"
    save_jpeg(kvasir_image(ctx.patient_rng(0), ctx.rng(DEFECT_OFFSET), cls), ctx.path(rel))
    return [_rec(ctx, rel, "unlabelled_image", "image file without a row in the label CSV", False)]


def lymph_node_wsi(ctx: GenContext, repo, res: GenResult) -> list[dict]:
    """A '.tiff' slide that is random bytes, listed in slides.csv."""
    src = res.rows[0]
    rel = f"slides/{src[repo.patient_column]}_node{len(res.rows):03d}.tiff"
    ctx.path(rel).write_bytes(ctx.rng(DEFECT_OFFSET).bytes(64 * 1024))
    res.rows.append({**src, repo.path_column: rel})
    return [_rec(ctx, rel, "not_a_tiff", "random bytes with a .tiff name, listed in slides.csv", True)]


PLANTERS = {"ctpa": ctpa, "isic": isic, "oct": oct_repo, "kvasir": kvasir, "lymph-node-wsi": lymph_node_wsi}


def plant(ctx: GenContext, repo, res: GenResult) -> list[dict]:
    fn = PLANTERS.get(repo.name)
    return fn(ctx, repo, res) if fn else []
