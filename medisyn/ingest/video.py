"""Video reader: the frames an annotation file names, cut from a video with PyAV, one segment at a time.

A surgical video is hours long, so :func:`read_frames` never holds it whole and never decodes
from the start for a late segment: it seeks to the keyframe at or before the first wanted
frame, decodes forward in presentation order and stops after the last one, yielding each
wanted frame as soon as it is decoded. A frame's index is its presentation time × the
annotation's rate, counted from the stream's first timestamp, so frame *i* is the frame the
annotation file means by row *i*; a wanted frame the decoder did not produce is rejected by
index, never replaced by a neighbour. Reasons follow :mod:`medisyn.ingest.readers`: fixed
texts built here (an exception's type name at most), and file-system errors raised as they are.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from medisyn.ingest.readers import Rejected, io_error

RATE_TOLERANCE = 0.01  # a stream rate further than this fraction from the annotation's fps rejects the video
PAST_END = "annotation past the video's end"
GAP = "frame not decoded (gap in the stream)"
TRUNCATED = "frame not decoded (the video ends before its declared length)"


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    frames: int  # the container's count, or duration × fps when the stream does not say
    width: int
    height: int


def _errors() -> tuple[type[BaseException], ...]:
    import av

    return (av.FFmpegError, OSError, EOFError, UnicodeDecodeError)


def _open(path: str | Path):
    """The opened container and its first video stream; whole-file problems as Rejected."""
    import av

    path = Path(path)
    if path.stat().st_size == 0:  # an OSError with errno (missing file) propagates from here
        raise Rejected("empty file (0 bytes)")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except _errors() as exc:
        if io_error(exc):
            raise
        raise Rejected(f"unreadable video ({type(exc).__name__})") from None
    if not container.streams.video:
        container.close()
        raise Rejected("no video stream")
    return container, container.streams.video[0]


def _rate(stream) -> Fraction:
    """The nominal rate: FFmpeg's guess (``av_guess_frame_rate``: r_frame_rate unless implausible), so a
    constant-rate stream with dropped frames keeps it; the average (frames / duration) would drift."""
    rate = stream.guessed_rate or stream.average_rate or stream.base_rate
    if not rate:
        raise Rejected("video has no frame rate")
    return Fraction(rate)


def _frame_count(container, stream, fps: Fraction) -> int:
    """The container's frame count, else its duration × fps (Matroska/WebM headers have no count)."""
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    if stream.duration and stream.time_base:
        seconds = stream.duration * stream.time_base
    else:
        seconds = Fraction(container.duration or 0, 1_000_000)  # container.duration is in av.time_base (1/1e6)
    return int(round(seconds * fps))


def probe_video(path: str | Path) -> VideoInfo:
    """Rate, frame count and size from the container's metadata only (no frame is decoded)."""
    with _opened(path) as (container, stream):
        fps = _rate(stream)
        ctx = stream.codec_context
        frames = _frame_count(container, stream, fps)
        return VideoInfo(fps=float(fps), frames=frames, width=int(ctx.width), height=int(ctx.height))


def read_frames(path: str | Path, indices: Sequence[int], fps: float) -> Iterator[tuple[int, np.ndarray | Rejected]]:
    """``(index, rgb uint8 H×W×3)`` for each wanted 0-based frame index (counted at ``fps``), in
    increasing order; ``(index, Rejected)`` for an index past the end, one the decoder skipped, or
    one behind damage met while decoding (a cut or corrupt stream: the frames before it stand).

    A generator: the file is opened at the first ``next()``, where whole-file problems raise
    :class:`Rejected` (unreadable or cut container, no video stream, no decodable frame, a
    stream rate more than 1% off ``fps``).
    Only the frame being yielded is held; decoding starts at the keyframe at or before
    ``min(indices)`` and stops after ``max(indices)``.
    """
    wanted = sorted({int(i) for i in indices})
    if not wanted:
        return
    if wanted[0] < 0:
        raise ValueError("frame indices are 0-based")
    with _opened(path) as (container, stream):
        rate = _rate(stream)
        if abs(float(rate) - fps) > RATE_TOLERANCE * fps:
            raise Rejected(
                f"video frame rate {round(float(rate), 2)} does not match the annotation's {round(float(fps), 2)} fps"
            )
        yield from _wanted_frames(container, stream, wanted, Fraction(fps).limit_denominator(100_000))


@contextlib.contextmanager
def _opened(path: str | Path):
    """(container, video stream), closed after the block; a decoder error inside it is a reject
    ("unreadable video"), an I/O error of the file system is raised as it is."""
    container, stream = _open(path)
    try:
        yield container, stream
    except _errors() as exc:
        if io_error(exc):
            raise
        raise Rejected(f"unreadable video ({type(exc).__name__})") from None
    finally:
        container.close()


def _timestamps(container, stream) -> Iterator[tuple[int, object]]:
    """``(timestamp, av.VideoFrame)`` in presentation order from the container's current position.

    The timestamp is ``best_effort_timestamp`` in ``stream.time_base`` units: what FFmpeg's own
    tools use, since an AVI stores only decode times and its plain ``pts`` can go backwards.
    """
    for packet in container.demux(stream):
        for frame in packet.decode():
            ts = frame.best_effort_timestamp
            if ts is None:
                ts = frame.pts
            if ts is None:
                raise Rejected("unreadable video (no frame timestamps)")
            yield ts, frame


def _wanted_frames(container, stream, wanted: list[int], fps: Fraction) -> Iterator[tuple[int, np.ndarray | Rejected]]:
    tb = stream.time_base
    # Frame 0 is the first frame shown, whatever its timestamp: an AVI with B-frames starts at 1/fps, an MP4 may
    # start at its edit list's offset. The first frame is one keyframe's decode away from the opened file's start.
    origin = next(_timestamps(container, stream), None)
    if origin is None:
        raise Rejected("no decodable video frame")
    start = origin[0]
    del origin

    def index_of(ts: int) -> int:
        return int(round((ts - start) * tb * fps))

    first_wanted = wanted[0]
    # Seek to the keyframe at or before the first wanted frame. A container whose index is coarse may land
    # after it: then seek again further back (1 s, 2 s, 4 s … before), down to the first frame at worst.
    target = start + int(Fraction(first_wanted) / fps / tb)
    margin = 0
    while True:
        offset = max(start, target - margin)
        container.seek(offset, stream=stream, backward=True, any_frame=False)
        frames = ((index_of(ts), frame) for ts, frame in _timestamps(container, stream))
        first = next(frames, None)
        if offset == start or (first is not None and first[0] <= first_wanted):
            break
        margin = max(2 * margin, int(1 / tb))
    # Decode forward. Damage met on the way (a cut or corrupt stream) rejects the wanted frames from there on,
    # by index, with the reason; the frames before it stand, so a segment before the damage is unaffected.
    declared = _frame_count(container, stream, fps)
    decoded = itertools.chain((first,) if first is not None else (), frames)
    del first  # the chain lets go of it once yielded: only the frame in hand is held
    k, last, damage = 0, -1, ""
    while k < len(wanted):
        try:
            item = next(decoded, None)
        except _errors() as exc:
            if io_error(exc):
                raise
            damage = f"unreadable video ({type(exc).__name__})"
            break
        if item is None:
            break
        index, frame = item
        if index <= last:  # two timestamps rounding to one index (variable rate): the first one stands
            continue
        last = index
        while k < len(wanted) and wanted[k] < index:
            yield wanted[k], Rejected(GAP)
            k += 1
        if k < len(wanted) and wanted[k] == index:
            rgb = frame.to_ndarray(format="rgb24")
            del frame, item
            yield index, rgb
            k += 1
    for index in wanted[k:]:
        # The stream ended: before the frame count its container declares, the file was cut short.
        yield index, Rejected(damage or (TRUNCATED if index < declared else PAST_END))
