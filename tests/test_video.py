"""The video reader: frame i decoded is frame i (by content), a late segment is reached by seeking, not by
decoding from the start, and every kind of bad video or bad index gets its fixed reason."""

from __future__ import annotations

import errno

import av
import numpy as np
import pytest

from medisyn.ingest.readers import Rejected
from medisyn.ingest.video import (
    GAP,
    PAST_END,
    TRUNCATED,
    VideoInfo,
    probe_video,
    read_frames,
)
from medisyn.phantoms import formats
from medisyn.phantoms.formats import frame_number, numbered_frame, write_test_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """10 s at 25 fps, a keyframe every 12 frames (H.264 in MP4 where FFmpeg has libx264)."""
    return write_test_video(tmp_path_factory.mktemp("video") / "video01.mp4", 250, 25, gop=12)


class Counting:
    """An opened container that counts the packets demuxed from it (and can make its first seek overshoot)."""

    packets = 0
    overshoot = 0.0  # seconds added to the first seek, as a coarse container index would
    fail: tuple[int, BaseException] | None = None  # (after this many packets, raise this), as damage would

    def __init__(self, container):
        self._c = container

    def __getattr__(self, name):
        return getattr(self._c, name)

    def demux(self, *args, **kwargs):
        for packet in self._c.demux(*args, **kwargs):
            Counting.packets += 1
            if Counting.fail and Counting.packets > Counting.fail[0]:
                raise Counting.fail[1]
            yield packet

    def seek(self, offset, *, stream, **kwargs):
        if Counting.overshoot:
            offset += int(Counting.overshoot / stream.time_base)
            Counting.overshoot = 0.0
        return self._c.seek(offset, stream=stream, **kwargs)


@pytest.fixture
def counting(monkeypatch):
    real = av.open
    Counting.packets, Counting.overshoot, Counting.fail = 0, 0.0, None
    monkeypatch.setattr(av, "open", lambda *a, **k: Counting(real(*a, **k)))
    return Counting


def decoded(items):
    """``[(index, number the frame spells or the reason)]``."""
    return [(i, x.reason if isinstance(x, Rejected) else frame_number(x)) for i, x in items]


def test_probe_reads_metadata(clip, tmp_path):
    assert probe_video(clip) == VideoInfo(fps=25.0, frames=250, width=64, height=48)
    # Matroska has no frame count in its header: estimated from the duration
    mkv = write_test_video(tmp_path / "v.mkv", 50, 25, size=(128, 96))
    assert probe_video(mkv) == VideoInfo(fps=25.0, frames=50, width=128, height=96)


def test_frames_are_the_wanted_ones_by_content(clip):
    out = list(read_frames(clip, [50, 0, 25, 25], 25))
    assert [i for i, _ in out] == [0, 25, 50]  # sorted, once each
    for i, rgb in out:
        assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
        assert frame_number(rgb) == i
        assert np.abs(rgb.astype(int) - numbered_frame(i).astype(int)).mean() < 4  # lossy, but the same picture


def test_late_segment_is_reached_by_seeking(clip, counting):
    assert decoded(read_frames(clip, [200, 225], 25)) == [(200, 200), (225, 225)]
    # one GOP at the start (frame 0's timestamp) + the keyframe at 192 up to 225; from the start would be 226
    assert counting.packets < 60, counting.packets


def test_a_seek_that_lands_late_backs_off(clip, counting):
    counting.overshoot = 3.0  # the first seek lands 3 s after frame 200
    assert decoded(read_frames(clip, [200, 201], 25)) == [(200, 200), (201, 201)]


def test_frames_stream_one_at_a_time(clip, counting):
    frames = read_frames(clip, [0, 240], 25)
    i, rgb = next(frames)
    assert (i, frame_number(rgb)) == (0, 0)
    assert counting.packets < 20, counting.packets  # frame 240 not decoded yet: nothing ahead is held
    assert decoded(frames) == [(240, 240)]


def test_index_past_the_end_is_rejected_per_index(clip):
    assert decoded(read_frames(clip, [249, 250, 400], 25)) == [(249, 249), (250, PAST_END), (400, PAST_END)]


def test_a_gap_is_never_filled_by_a_neighbour(tmp_path):
    gap = write_test_video(tmp_path / "gap.mp4", 60, 25, drop={30})
    assert decoded(read_frames(gap, [29, 30, 31], 25)) == [(29, 29), (30, GAP), (31, 31)]


def test_frame_rate_must_match_the_annotation(tmp_path, clip):
    v30 = write_test_video(tmp_path / "v30.mp4", 10, 30)
    with pytest.raises(Rejected) as exc:
        list(read_frames(v30, [0], 25))
    assert exc.value.reason == "video frame rate 30.0 does not match the annotation's 25.0 fps"
    assert decoded(read_frames(clip, [0], 25.2)) == [(0, 0)]  # within 1%


def test_avi_with_b_frames(tmp_path):
    """SAR-RARP50 ships video_left.avi. AVI stores decode times only: with B-frames the first frame is shown at
    1/fps, so indices count from the first frame's timestamp, not from zero."""
    avi = write_test_video(tmp_path / "video_left.avi", 120, 60, gop=12, bframes=2)
    assert probe_video(avi) == VideoInfo(fps=60.0, frames=120, width=64, height=48)
    assert decoded(read_frames(avi, [0, 6, 60, 66, 119, 120], 60)) == [
        (0, 0),
        (6, 6),
        (60, 60),
        (66, 66),
        (119, 119),
        (120, PAST_END),
    ]


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file (0 bytes)"),
        (b"not a video at all " * 200, "unreadable video (InvalidDataError)"),
    ],
)
def test_garbage_is_rejected(tmp_path, content, reason):
    path = tmp_path / "video02.mp4"
    path.write_bytes(content)
    for call in (lambda: probe_video(path), lambda: list(read_frames(path, [0], 25))):
        with pytest.raises(Rejected) as exc:
            call()
        assert exc.value.reason == reason


def test_truncated_files(tmp_path, clip):
    # MP4 keeps its index (moov) after the data: a cut file cannot be opened
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    with pytest.raises(Rejected) as exc:
        list(read_frames(cut, [0], 25))
    assert exc.value.reason == "unreadable video (InvalidDataError)"
    # AVI declares its frame count up front: frames before the cut stand, the rest are rejected as cut off
    avi = write_test_video(tmp_path / "full.avi", 250, 25)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(avi.read_bytes()[: avi.stat().st_size // 5])
    out = decoded(read_frames(cut, [0, 200, 300], 25))
    assert out == [(0, 0), (200, TRUNCATED), (300, PAST_END)]


def test_damage_midway_rejects_the_rest_and_io_errors_propagate(clip, counting):
    counting.fail = (40, av.error.InvalidDataError(-1094995529, "Invalid data found when processing input"))
    out = decoded(read_frames(clip, [0, 12, 100, 120], 25))
    damage = "unreadable video (InvalidDataError)"
    assert out == [(0, 0), (12, 12), (100, damage), (120, damage)]  # the frames before the damage stand
    counting.packets, counting.fail = 0, (40, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(OSError) as exc:
        list(read_frames(clip, [0, 100], 25))
    assert exc.value.errno == errno.EIO and not isinstance(exc.value, Rejected)


def test_no_video_stream(tmp_path):
    path = tmp_path / "audio.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(Rejected) as exc:
        probe_video(path)
    assert exc.value.reason == "no video stream"


def test_file_system_errors_propagate(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_frames(tmp_path / "missing.mp4", [0], 25))


def test_reasons_name_no_path(tmp_path):
    path = tmp_path / "patient-4711.mp4"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(Rejected) as exc:
        list(read_frames(path, [0], 25))
    assert "4711" not in exc.value.reason and "4711" not in str(exc.value)


def test_test_videos_differ_by_seed():
    a, b = numbered_frame(7, seed=0), numbered_frame(7, seed=1)
    assert frame_number(a) == frame_number(b) == 7
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 20  # two replicas' videos share no frame
    assert formats.BIT_ROWS * formats.BIT_COLS == 16
