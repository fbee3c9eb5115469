"""Slides labelled from lesion outlines: ASAP XML in, tumour fractions, labels, caps (no Ray)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from types import SimpleNamespace

import numpy as np
import openslide
import pytest
from PIL import Image

from medisyn.ingest import lesions as L
from medisyn.ingest.readers import Rejected
from medisyn.phantoms import pathology
from medisyn.phantoms.formats import write_asap

# A CAMELYON16-style file: tumour square [1000, 3000)² in `_0` (its points out of Order), a `Tumor` triangle
# far away, a `_2` hole [1800, 2200)² cut out of the square, and the AnnotationGroups ASAP writes.
ASAP_XML = """<?xml version="1.0"?>
<ASAP_Annotations>
\t<Annotations>
\t\t<Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="2" X="3000" Y="3000" />
\t\t\t\t<Coordinate Order="0" X="1000" Y="1000" />
\t\t\t\t<Coordinate Order="3" X="1000" Y="3000" />
\t\t\t\t<Coordinate Order="1" X="3000.0" Y="1000.0" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t\t<Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="Tumor" Color="#F4FA58">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="0" X="10000" Y="10000" />
\t\t\t\t<Coordinate Order="1" X="10256" Y="10000" />
\t\t\t\t<Coordinate Order="2" X="10000" Y="10256" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t\t<Annotation Name="Annotation 2" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="0" X="1800" Y="1800" />
\t\t\t\t<Coordinate Order="1" X="2200" Y="1800" />
\t\t\t\t<Coordinate Order="2" X="2200" Y="2200" />
\t\t\t\t<Coordinate Order="3" X="1800" Y="2200" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t</Annotations>
\t<AnnotationGroups>
\t\t<Group Name="_0" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>
\t\t<Group Name="_2" PartOfGroup="None" Color="#00ff00"><Attributes /></Group>
\t</AnnotationGroups>
</ASAP_Annotations>
"""


@pytest.fixture(scope="module")
def lesions(tmp_path_factory):
    path = tmp_path_factory.mktemp("asap") / "tumor_001.xml"
    path.write_text(ASAP_XML)
    return L.read_asap(path)


def test_read_asap_real_layout(lesions):
    assert len(lesions.tumour) == 2 and len(lesions.holes) == 1
    # sorted by Order, level-0 floats
    assert lesions.tumour[0].tolist() == [[1000, 1000], [3000, 1000], [3000, 3000], [1000, 3000]]
    assert lesions.holes[0].dtype == np.float64 and lesions.holes[0].min() == 1800


@pytest.mark.parametrize(
    "box, want",
    [
        ((1200, 1200, 256), 1.0),  # fully inside the tumour
        ((872, 1200, 256), 0.5),  # on the left edge: half inside
        ((1900, 1900, 256), 0.0),  # inside the hole
        ((1672, 1900, 256), 0.5),  # half over the hole's left edge
        ((5000, 5000, 256), 0.0),  # outside
        ((10000, 10000, 256), 0.5),  # the `Tumor` triangle fills half its box
    ],
)
def test_tumour_fraction(lesions, box, want):
    assert L.tumour_fraction(lesions, *box) == pytest.approx(want, abs=1 / 64)


def test_thresholds_give_positive_negative_left_out(lesions):
    boxes = [(1200, 1200, 256), (1300, 2500, 256), (872, 1200, 256), (1900, 1900, 256), (1000 - 192, 1500, 256)]
    labels = L.label_patches(lesions, boxes, tumour_min=0.5, normal_max=0.0)
    assert labels == ["positive", "positive", "positive", "negative", None]  # 0.5 >= 0.5; 0.25 in between
    assert Counter(L.label_patches(lesions, boxes, tumour_min=0.9, normal_max=0.3)) == {
        "positive": 2,
        "negative": 2,
        None: 1,
    }
    assert L.label_patches(None, boxes) == ["negative"] * 5  # a normal slide without outlines
    with pytest.raises(ValueError):
        L.label_patches(lesions, boxes, tumour_min=0.2, normal_max=0.3)


def test_write_asap_round_trip(tmp_path):
    square = [(0.0, 0.0), (100.5, 0.0), (100.5, 100.0), (0.0, 100.0)]
    hole = [(10.0, 10.0), (20.0, 10.0), (20.0, 20.0)]
    write_asap(tmp_path / "a.xml", [square], holes=[hole])
    got = L.read_asap(tmp_path / "a.xml")
    assert [p.tolist() for p in got.tumour] == [[list(p) for p in square]]
    assert [p.tolist() for p in got.holes] == [[list(p) for p in hole]]
    assert "AnnotationGroups" in (tmp_path / "a.xml").read_text()


def _polygon(points: list, group: str = "_0", kind: str = "Polygon") -> str:
    coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(points))
    return (
        f'<ASAP_Annotations><Annotations><Annotation Name="A" Type="{kind}" PartOfGroup="{group}">'
        f"<Coordinates>{coords}</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )


@pytest.mark.parametrize(
    "text, reason",
    [
        (ASAP_XML[: len(ASAP_XML) // 2], "malformed annotation XML"),
        ("", "empty annotation file"),
        ("<ASAP_Annotations><Annotations/></ASAP_Annotations>", "no annotation in the file"),
        ("<Annotations/>", "not an ASAP annotation file"),
        (_polygon([(0, 0), (10, 10)]), "annotation polygon with fewer than 3 points"),
        (_polygon([(0, 0), (5, 5), (10, 10)]), "annotation polygon with no area"),
        (_polygon([(0, 0), (9, 0), (0, 9)], group="None"), "annotation group neither tumour nor exclusion"),
        (_polygon([(0, 0), (9, 0), (0, 9)], kind="Dot"), "annotation that is not an area"),
        (_polygon([(0, 0), (9, 0), (0, 9)], group="_2"), "no tumour polygon in the file"),
        (_polygon([(0, 0), ("x", 0), (0, 9)]), "annotation coordinate is not a number"),
        ('<!DOCTYPE a [<!ENTITY e "x">]><ASAP_Annotations/>', "annotation file declares a DTD"),
    ],
)
def test_bad_annotation_files_are_rejected(tmp_path, text, reason):
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(Rejected) as exc:
        L.read_asap(path)
    assert exc.value.reason.startswith(reason)
    assert "bad.xml" not in exc.value.reason


def test_missing_annotation_file_is_an_io_error(tmp_path):
    with pytest.raises(FileNotFoundError):  # the unit fails and reruns; a listing checks presence
        L.read_asap(tmp_path / "absent.xml")


# ----------------------------------------------------------------------------- a phantom slide

# Level 0 is 1024²: a background band x < 128, pink tissue elsewhere, purple tumour in [256, 672) × [256, 768)
# but not in the hole [384, 512)². At level 1 with 64-px patches each patch is a 128-px level-0 square:
# 8 background, 11 positive, the 4 of column x0 = 640 a quarter tumour (left out), 41 negative (the hole's one).
TUMOUR = [(256, 256), (672, 256), (672, 768), (256, 768)]
HOLE = [(384, 384), (512, 384), (512, 512), (384, 512)]
PINK, PURPLE, GLASS = (235, 160, 210), (110, 50, 150), (245, 245, 245)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    img = np.empty((1024, 1024, 3), np.uint8)
    img[:] = PINK
    img[256:768, 256:672] = PURPLE
    img[384:512, 384:512] = PINK
    img[:, :128] = GLASS
    root = tmp_path_factory.mktemp("slide")
    pathology.write_slide(pathology.pyramid(img, 2), root / "tumor_001.tif")
    write_asap(root / "tumor_001.xml", [TUMOUR], holes=[HOLE])
    return root / "tumor_001.tif", L.read_asap(root / "tumor_001.xml")


def _patches(slide, lesions, **kw):
    args = dict(level=1, patch=64, overlap=0.0, min_tissue=0.5, tumour_min=0.5, normal_max=0.0)
    args.update(slide_positive=True, per_slide=0, seed=0)
    args.update(kw)
    return list(L.iter_labelled_patches(slide, lesions, **args))


def test_labelled_patches_agree_with_the_polygon(slide):
    path, lesions = slide
    out = _patches(path, lesions)
    assert len(out) == 64
    kinds = Counter(m.get("label", m.get("left_out", "background")) for _, m in out)
    assert kinds == {"positive": 11, "negative": 41, L.LEFT_BETWEEN: 4, "background": 8}
    for arr, m in out:
        inside = 256 <= m["x0"] < 672 and 256 <= m["y0"] < 768 and (m["x0"], m["y0"]) != (384, 384)
        assert m["size0"] == 128 and (m["x0"], m["y0"]) == (2 * m["x"], 2 * m["y"])
        if m.get("label") == "positive":
            assert inside and m["tumour"] == 1.0
            assert np.abs(arr.reshape(-1, 3).mean(0) - PURPLE).max() < 3  # the pixels are the outlined tumour
        elif m.get("label") == "negative":
            assert not inside and m["tumour"] == 0.0 and np.abs(arr.reshape(-1, 3).mean(0) - PINK).max() < 3
        elif "left_out" in m:
            assert arr is None and m["x0"] == 640 and m["tumour"] == 0.25
        else:
            assert arr is None and m["x0"] == 0


def test_negative_slide_needs_no_xml_and_positive_one_does(slide):
    path, _ = slide
    out = _patches(path, None, slide_positive=False)
    assert Counter(m.get("label", "background") for _, m in out) == {"negative": 56, "background": 8}
    with pytest.raises(Rejected, match="tumour slide without lesion annotations"):
        _patches(path, None, slide_positive=True)


def test_cap_per_slide_is_seeded_reads_only_kept_patches(slide, monkeypatch):
    path, lesions = slide
    reads = []
    original = openslide.OpenSlide.read_region
    monkeypatch.setattr(openslide.OpenSlide, "read_region", lambda self, *a: reads.append(a) or original(self, *a))
    out = _patches(path, lesions, per_slide=3, seed=7)
    kept = {(m["x"], m["y"]): m["label"] for arr, m in out if arr is not None}
    assert (
        Counter(kept.values()) == {"positive": 3, "negative": 3} and sum(a[2] == (64, 64) for a in reads) == 6
    )  # thumbnails aside
    capped = Counter(m["label"] for _, m in out if m.get("left_out") == L.LEFT_CAP)
    assert capped == {"positive": 8, "negative": 38}
    # the kept patches are each class's lowest seeded ranks
    full = {(m["x"], m["y"]): m["label"] for _, m in _patches(path, lesions) if "label" in m}
    for cls in ("positive", "negative"):
        ranked = sorted((k for k, v in full.items() if v == cls), key=lambda k: L.patch_rank(7, 1, *k))
        assert {k for k, v in kept.items() if v == cls} == set(ranked[:3])
    again = {(m["x"], m["y"]) for arr, m in _patches(path, lesions, per_slide=3, seed=7) if arr is not None}
    other = {(m["x"], m["y"]) for arr, m in _patches(path, lesions, per_slide=3, seed=8) if arr is not None}
    assert again == set(kept) and other != set(kept)


def test_cap_is_independent_of_order():
    labels = {(x, y): ("positive" if (x + y) % 3 else "negative") for x in range(0, 640, 64) for y in range(0, 640, 64)}
    backwards = dict(reversed(list(labels.items())))
    kept = L.cap_per_class(labels, 5, seed=3, level=0)
    assert kept == L.cap_per_class(backwards, 5, seed=3, level=0)
    assert Counter(labels[k] for k in kept) == {"positive": 5, "negative": 5}
    assert kept != L.cap_per_class(labels, 5, seed=4, level=0)
    assert L.cap_per_class(labels, 0, seed=3, level=0) == set(labels)


def test_level_for_magnification(slide):
    power, mpp = openslide.PROPERTY_NAME_OBJECTIVE_POWER, openslide.PROPERTY_NAME_MPP_X
    fake = SimpleNamespace(properties={power: "40", mpp: "0.5"}, level_downsamples=(1.0, 2.0, 4.0, 8.0016))
    assert [L.level_for_magnification(fake, m) for m in (40, 20, 10, 5)] == [0, 1, 2, 3]  # the power wins
    with pytest.raises(Rejected, match="no pyramid level at 30x"):
        L.level_for_magnification(fake, 30)
    nanozoomer = SimpleNamespace(properties={mpp: "0.2265"}, level_downsamples=(1.0, 2.0, 4.0))
    assert L.level_for_magnification(nanozoomer, 10) == 2  # no power stated: 10 / mpp = 44x, taken as 40x
    with pytest.raises(Rejected, match="neither its objective power nor its resolution"):
        L.level_for_magnification(nanozoomer, 10, from_mpp=False)
    with pytest.raises(Rejected, match="neither its objective power nor its resolution"):
        L.level_for_magnification(SimpleNamespace(properties={power: "n/a"}, level_downsamples=(1.0,)), 40)
    # the phantom, a generic TIFF like CAMELYON16's: OpenSlide gives mpp 0.25 from its resolution tags, no power
    assert L.level_for_magnification(slide[0], 20) == 1
    with pytest.raises(Rejected, match="neither its objective power"):
        L.level_for_magnification(slide[0], 40, from_mpp=False)


def test_oversized_annotation_file_is_rejected_unparsed(tmp_path, monkeypatch):
    path = tmp_path / "big.xml"
    path.write_text(ASAP_XML)
    monkeypatch.setattr(L, "MAX_XML_BYTES", len(ASAP_XML) - 1)
    with pytest.raises(Rejected, match="annotation file larger than"):
        L.read_asap(path)


def _mask(path, arr, levels=1):
    """A tumour-mask TIFF as CAMELYON ships them (uint8, non-zero = tumour), flat or pyramidal."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        for k in range(levels):
            tw.write(arr[:: 2**k, :: 2**k], photometric="minisblack", subfiletype=1 if k else 0)


def test_tumour_mask_agrees_with_the_polygon(slide, tmp_path, monkeypatch):
    path, lesions = slide
    mask = np.zeros((1024, 1024), np.uint8)  # the fixture's outline (tumour less the hole) painted, value 2
    mask[256:768, 256:672] = 2
    mask[384:512, 384:512] = 0
    _mask(tmp_path / "coarse.tif", mask[::8, ::8])  # 128 px: 1/8 of level 0
    _mask(tmp_path / "odd.tif", np.asarray(Image.fromarray(mask).resize((100, 100), Image.Resampling.NEAREST)))
    coarse = L.read_tumour_mask(tmp_path / "coarse.tif", L.slide_dimensions(path))
    odd = L.read_tumour_mask(tmp_path / "odd.tif", (1024, 1024))
    for y0 in range(0, 1024, 128):
        for x0 in range(0, 1024, 128):
            want = L.tumour_fraction(lesions, x0, y0, 128)
            assert L.tumour_fraction(coarse, x0, y0, 128) == pytest.approx(want, abs=1 / L.GRID)
            assert L.tumour_fraction(odd, x0, y0, 128) == pytest.approx(want, abs=2 / 12.5)  # a mask px a side
    polygon = [(a is None, m.get("label"), m.get("left_out")) for a, m in _patches(path, lesions)]
    assert [(a is None, m.get("label"), m.get("left_out")) for a, m in _patches(path, coarse)] == polygon
    # a pyramid is read at its finest level under the pixel cap (here the 256 px level of a 1024 px mask)
    _mask(tmp_path / "pyramid.tif", mask, levels=3)
    monkeypatch.setattr(L, "MASK_PIXELS", 300 * 300)
    pyr = L.read_tumour_mask(tmp_path / "pyramid.tif", (1024, 1024))
    assert pyr.tumour.shape == (256, 256) and pyr.scale == (0.25, 0.25)
    monkeypatch.setattr(L, "MASK_PIXELS", 100)
    with pytest.raises(Rejected, match="tumour mask too large at every level"):
        L.read_tumour_mask(tmp_path / "pyramid.tif", (1024, 1024))


def test_tumour_mask_of_another_shape_or_not_a_tiff_is_a_reject(tmp_path):
    _mask(tmp_path / "wide.tif", np.ones((64, 128), np.uint8))
    with pytest.raises(Rejected, match="tumour mask's aspect ratio differs from the slide's"):
        L.read_tumour_mask(tmp_path / "wide.tif", (1024, 1024))
    assert L.read_tumour_mask(tmp_path / "wide.tif", (2048, 1024)).scale == (1 / 16, 1 / 16)
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(Rejected, match=r"unreadable tumour mask \(\w+\)"):
        L.read_tumour_mask(tmp_path / "junk.tif", (1024, 1024))


def test_worker_tiles_at_the_stated_magnification(slide, tmp_path):
    """``wsi.magnification``: a 0.25 µm/px slide is cut at level 0 for 40x and level 1 for 20x; a slide
    that states neither objective power nor resolution is a reject."""
    import tifffile

    from medisyn.ingest import worker

    path, _ = slide
    s = SimpleNamespace(kind="wsi", wsi_level=0, wsi_patch_size=256, wsi_overlap=0.0, wsi_tissue_fraction=0.0)
    levels = {}
    for m in (40, 20):
        s.wsi_magnification = m
        levels[m] = {suffix.split(",")[0] for _, suffix in worker._images(None, s, path)}
    assert levels == {40: {"#level=0"}, 20: {"#level=1"}}
    bare = tmp_path / "bare.tif"  # a tiled TIFF without resolution tags
    tifffile.imwrite(bare, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    assert worker._wsi_level(bare, SimpleNamespace(wsi_level=2, wsi_magnification=0.0)) == 2
    with pytest.raises(Rejected, match="neither its objective power nor its resolution"):
        worker._wsi_level(bare, SimpleNamespace(wsi_level=0, wsi_magnification=40.0))


def test_worker_labels_a_slide_from_its_tumour_mask(slide, tmp_path):
    """``lesions.masks``: the worker reads the item's annotation as a mask (not XML) and captions the
    same patches as the outlines do."""
    from medisyn.ingest import worker
    from medisyn.ingest.units import Item

    path, lesions = slide
    mask = np.zeros((1024, 1024), np.uint8)
    mask[256:768, 256:672] = 1
    mask[384:512, 384:512] = 0
    _mask(tmp_path / "m.tif", mask[::4, ::4])
    alternatives = (("positive", ("metastasis",), "pos"), ("negative", ("normal",), "neg"))
    item = Item("r/1", str(path), "r", "p", "train", ("metastasis",), "", annotation=str(tmp_path / "m.tif"))
    item = dataclasses.replace(item, alternatives=alternatives)
    s = SimpleNamespace(kind="wsi", wsi_level=1, wsi_magnification=0.0, wsi_patch_size=64, wsi_overlap=0.0)
    s.__dict__.update(wsi_tissue_fraction=0.5, tumour_min=0.5, normal_max=0.0, per_slide=0, seed=0, lesion_masks=True)
    left = Counter()
    got = Counter(c[1] for _, arr, _, c in worker._slide(item, s, str(path), left) if arr is not None)
    want = Counter(m.get("label") for a, m in _patches(path, lesions) if a is not None)
    assert got == {"pos": want["positive"], "neg": want["negative"]} == {"pos": 11, "neg": 41}
    assert left == {f"lesions: {L.LEFT_BETWEEN}": 4}
