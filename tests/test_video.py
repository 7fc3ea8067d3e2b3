import numpy as np

from cosed.video import decode_mp4, encode_mp4, stitch


def clip(value, frames=5, size=32):
    return np.full((frames, size, size, 3), value, dtype=np.uint8)


def test_mp4_round_trip_keeps_every_frame():
    frames = np.random.default_rng(0).integers(0, 255, size=(9, 48, 64, 3), dtype=np.uint8)
    data = encode_mp4(frames, fps=7)
    assert data[4:8] == b"ftyp"
    decoded = decode_mp4(data)
    assert decoded.shape == (9, 48, 64, 3)


def test_stitch_hard_cuts_keep_order_and_count():
    video = stitch([clip(10), clip(200), clip(90)])
    assert len(video) == 15
    assert [int(video[i].mean()) for i in (0, 5, 10)] == [10, 200, 90]


def test_crossfade_blends_between_scenes():
    video = stitch([clip(0, 6), clip(200, 6)], crossfade_frames=2)
    assert len(video) == 10
    means = [int(f.mean()) for f in video]
    assert means[:4] == [0] * 4 and 0 < means[4] < means[5] < 200 and means[6:] == [200] * 4


def test_decoded_stitched_video_shows_scenes_in_order():
    video = decode_mp4(encode_mp4(stitch([clip(30, 4), clip(220, 4)]), fps=7))
    assert len(video) == 8
    assert abs(video[1].mean() - 30) < 8 and abs(video[6].mean() - 220) < 8


def test_encoded_clips_join_without_re_encoding_into_the_same_frames():
    from cosed.video import concat_mp4, encode_clip

    clips = [encode_clip(clip(value, frames), fps=7) for value, frames in ((30, 6), (220, 6), (120, 5))]
    joined = concat_mp4([c.data for c in clips], metadata={"title": "t"})
    assert [c.frames for c in clips] == [6, 6, 5]
    assert np.array_equal(decode_mp4(joined), np.concatenate([decode_mp4(c.data) for c in clips]))


def top_level_boxes(data: bytes) -> list[str]:
    """The mp4's top-level box types in file order (size-prefixed ISO BMFF boxes)."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = int.from_bytes(data[offset:offset + 4], "big"), data[offset + 4:offset + 8].decode("latin-1")
        if size == 1:    # a 64-bit size follows the type
            size = int.from_bytes(data[offset + 8:offset + 16], "big")
        assert size >= 8, f"bad box size at {offset}"
        boxes.append(kind)
        offset += size
    assert offset == len(data)
    return boxes


def test_clips_and_task_videos_have_their_index_first_so_a_browser_streams_them_from_a_bucket():
    from cosed.video import concat_mp4, encode_clip

    clips = [encode_clip(clip(value, 5), fps=7) for value in (30, 220)]
    for data in [c.data for c in clips] + [concat_mp4([c.data for c in clips], metadata={"title": "t"})]:
        boxes = top_level_boxes(data)
        assert boxes[0] == "ftyp" and "mdat" in boxes
        assert boxes.index("moov") < boxes.index("mdat"), boxes   # faststart: no seek to the end first
