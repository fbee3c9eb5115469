"""Cholec80 and SAR-RARP50 at demo scale, as their publishers ship them: videos and annotation files.

A video is a patient (``surgery.video_schedule``): every frame ingest samples from it (every 25th of
Cholec80's 25 fps, every 6th of SAR-RARP50's 60 fps) is drawn with the flat phantoms' frame function
(``surgery.cholec_frame`` / ``rarp_frame``), and the frames up to the next sample repeat it (a static
scene: cheap to encode, and a sample one frame off would still show its class). Each sample starts a
GOP, so it is a keyframe; H.264 at CRF 10 (≈ 39 dB PSNR against the drawing, where the flat layout's
JPEG quality 90 gives ≈ 38; 4:2:0 chroma caps it near 40) keeps the classes as distinct as the flat
layout's JPEG/PNG frames. Neither entry has planted defects (``defects`` is accepted and unused).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..replicas import (
    CHOLEC_EVERY,
    CHOLEC_FPS,
    CHOLEC_PHRASES,
    LEFT_EVERY,
    SAR_EVERY,
    SAR_FPS,
    SAR_PHRASES,
    TOOLS,
    Writer,
    expected,
)
from ..surgery import cholec_frame, rarp_frame, rarp_other_frame, video_schedule

__all__ = ["cholec80", "sar_rarp50", "write_video"]

CRF = "10"  # libx264 quality: lower is better; 10 is near the 4:2:0 ceiling on these frames

# Cholec80's phases in surgical order (the demo's five of the seven) and the tools each one shows
CHOLEC_TOOLS = {
    "Preparation": {"Grasper", "Hook"},
    "CalotTriangleDissection": {"Grasper", "Hook"},
    "ClippingCutting": {"Grasper", "Clipper"},
    "GallbladderPackaging": {"Grasper", "SpecimenBag"},
    "CleaningCoagulation": {"Irrigator"},
}
CHOLEC_PHASES = tuple(CHOLEC_TOOLS)
# SAR-RARP50's action ids for the demo's four actions, in the order of a suture throw
SAR_ACTIONS = {"picking_needle": 1, "positioning_needle": 2, "pushing_needle": 3, "cutting_suture": 6}
SAR_OTHER_EVERY = 5  # every 5th operation opens with an action-0 ("Other") sample: unmapped, left out
SAR_TEST_FRACTION = 0.2  # SAR-RARP50's 10 test operations of 50 (videos 41-50)
LEFT_UNMAPPED = "unmapped label (action)"
OTHER_RNG = 500_000  # rng index space of the action-0 frames (below common.PATIENT_OFFSET)


def write_video(path: Path, pictures: Sequence[np.ndarray], every: int, fps: int) -> int:
    """Encode each RGB picture as ``every`` identical frames (the first a keyframe); returns the frame count.

    libx264 (no B-frames, a GOP per picture; preset ultrafast: twice veryfast's bytes at the same CRF, in
    less than half its time) in MP4 or AVI alike; mpeg4 at its finest quantisers where FFmpeg lacks
    libx264. Deterministic: same pictures, same bytes.
    """
    import av

    height, width = pictures[0].shape[:2]
    rate = Fraction(fps)
    with av.open(str(path), "w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = every
        stream.codec_context.max_b_frames = 0
        if codec == "libx264":
            stream.options = {"crf": CRF, "preset": "ultrafast", "bf": "0", "keyint": str(every)}
        else:
            stream.options = {"qmin": "1", "qmax": "2"}
        for k, rgb in enumerate(pictures):
            yuv = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()
            for j in range(every):  # the colour conversion once per picture: the repeats are plain copies
                frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
                frame.pts, frame.time_base = k * every + j, 1 / rate
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return len(pictures) * every


def _video_split(n_videos: int) -> dict:
    return {"by": "video hash (ingest.split_fractions)", "groups": n_videos}


def cholec80(w: Writer, n: int, defects: bool) -> dict:
    """``cholec80/videos/videoNN.mp4`` (25 fps) with ``phase_annotations/videoNN-phase.txt`` (a row per
    frame, header ``Frame<TAB>Phase``), ``tool_annotations/videoNN-tool.txt`` (a row per second but the
    last) and ``videos/videoNN-timestamp.txt``; every video runs the five phases in surgical order."""
    schedule: dict[int, list[tuple[str, int]]] = {}
    for v, phase, i in video_schedule(list(CHOLEC_PHASES), n):
        schedule.setdefault(v, []).append((phase, i))
    for v, samples in schedule.items():
        name = f"video{v + 1:02d}"
        pictures = [cholec_frame(w.ctx.patient_rng(v), w.ctx.rng(i), phase) for phase, i in samples]
        frames = write_video(w.path(f"cholec80/videos/{name}.mp4"), pictures, CHOLEC_EVERY, CHOLEC_FPS)
        phases = [phase for phase, _ in samples for _ in range(CHOLEC_EVERY)]
        w.csv(f"cholec80/phase_annotations/{name}-phase.txt", ["Frame", "Phase"], list(enumerate(phases)), "\t")
        seconds = range(0, frames - CHOLEC_EVERY, CHOLEC_EVERY)  # the last sample has no tool row
        tools = [[f, *(int(t in CHOLEC_TOOLS[phases[f]]) for t in TOOLS)] for f in seconds]
        w.csv(f"cholec80/tool_annotations/{name}-tool.txt", ["Frame", *TOOLS], tools, "\t")
        stamps = (f"{f}\t{f // 90000:02d}:{f // 1500 % 60:02d}:{f // 25 % 60:02d}\n" for f in range(frames))
        w.text(f"cholec80/videos/{name}-timestamp.txt", "".join(stamps))
    n_videos = len(schedule)
    return expected(
        n_videos * len(CHOLEC_PHASES),
        {CHOLEC_PHRASES[p]: n_videos for p in CHOLEC_PHASES},
        {LEFT_EVERY.format(CHOLEC_EVERY): n_videos * len(CHOLEC_PHASES) * (CHOLEC_EVERY - 1)},
        splits=_video_split(n_videos),
        defects=[],
    )


def sar_rarp50(w: Writer, n: int, defects: bool) -> dict:
    """``{train1,train2,test}/video_N/video_left.avi`` (60 fps) with ``action_discrete.txt`` (headerless
    ``frame,action`` rows at 10 Hz, frames zero-padded to 9 digits); each operation one throw: picking up,
    positioning, pushing, cutting, every 5th opening with a sample of action 0 ("Other")."""
    schedule: dict[int, list[tuple[str, int]]] = {}
    for v, action, i in video_schedule(list(SAR_ACTIONS), n):
        schedule.setdefault(v, []).append((action, i))
    n_videos = len(schedule)
    n_test = max(1, round(n_videos * SAR_TEST_FRACTION))
    n_train = n_videos - n_test
    classes: dict[str, int] = {}
    splits = {"train": 0, "test": 0}
    other = 0
    for v, samples in schedule.items():
        if v < n_train:  # videos 1.. in train1 then train2; test from 41 (after the train numbers at larger scales)
            folder = f"{'train1' if v < (n_train + 1) // 2 else 'train2'}/video_{v + 1}"
        else:
            folder = f"test/video_{max(41, n_train + 1) + v - n_train}"
        pictures, actions = [], []
        if v % SAR_OTHER_EVERY == 0:
            pictures.append(rarp_other_frame(w.ctx.patient_rng(v), w.ctx.rng(OTHER_RNG + v)))
            actions.append(0)
            other += 1
        for action, i in samples:
            pictures.append(rarp_frame(w.ctx.patient_rng(v), w.ctx.rng(i), action))
            actions.append(SAR_ACTIONS[action])
            phrase = SAR_PHRASES[str(SAR_ACTIONS[action])]
            classes[phrase] = classes.get(phrase, 0) + 1
            splits["test" if folder.startswith("test") else "train"] += 1
        write_video(w.path(f"{folder}/video_left.avi"), pictures, SAR_EVERY, SAR_FPS)
        w.csv(f"{folder}/action_discrete.txt", None, [[f"{k * SAR_EVERY:09d}", a] for k, a in enumerate(actions)])
    return expected(sum(classes.values()), classes, {LEFT_UNMAPPED: other}, splits=splits, groups=n_videos, defects=[])
