import numpy as np
import pytest

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
    from cosed.video import concat_mp4, count_frames

    clips = [encode_mp4(clip(value, frames), fps=7) for value, frames in ((30, 6), (220, 6), (120, 5))]
    joined = concat_mp4(clips, metadata={"title": "t"})
    assert [count_frames(c) for c in clips] == [6, 6, 5] and count_frames(joined) == 17
    assert np.array_equal(decode_mp4(joined), np.concatenate([decode_mp4(c) for c in clips]))


def moving(frames=6, size=64, seed=0):
    """Frames with texture and motion, the kind an encoder makes decisions on (flat frames hide them)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, size, size, 3)).astype(int)
    return np.clip(base + rng.integers(-8, 9, (frames, 1, 1, 3)).cumsum(axis=0), 0, 255).astype(np.uint8)


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
    from cosed.video import concat_mp4

    clips = [encode_mp4(moving(seed=seed), fps=7) for seed in (1, 2)]
    for data in clips + [concat_mp4(clips, metadata={"title": "t"})]:
        boxes = top_level_boxes(data)
        assert boxes[0] == "ftyp" and "mdat" in boxes
        assert boxes.index("moov") < boxes.index("mdat"), boxes   # faststart: no seek to the end first


def test_the_same_frames_encode_to_the_same_bytes_in_other_processes_and_under_load():
    """x264's macroblock-tree rate control and its thread count made clips differ between workers
    (about 1 encode in 50 on an idle machine, most of them under load)."""
    import subprocess
    import sys

    code = ("import hashlib, numpy as np; from test_video import moving; from cosed.video import encode_mp4; "
            "print(len({hashlib.sha256(encode_mp4(moving(seed=1), 7)).hexdigest() for _ in range(40)}), "
            "hashlib.sha256(encode_mp4(moving(seed=1), 7)).hexdigest())")
    env = {**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent)}
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
                .stdout.split() for _ in range(3)]
    finally:
        for process in load:
            process.kill()
    assert {count for count, _ in runs} == {"1"} and len({digest for _, digest in runs}) == 1


def test_a_clip_request_whose_scene_bytes_do_not_match_its_hash_is_refused(tmp_path, tiny_run):
    """A clip may only ever animate the scene its request names by content (a scene re-rendered elsewhere
    with other pixels, or a stale file, is never animated silently)."""
    import hashlib

    from cosed.calls import ClipRequest
    from cosed.images import png_bytes
    from cosed.video import SceneMismatch, scene_image

    _, cfg, backend = tiny_run
    scene = moving(seed=3)[0]
    data = png_bytes(scene)
    (tmp_path / "scene.png").write_bytes(data)

    def request(digest: str) -> ClipRequest:
        return ClipRequest("t", 1, str(tmp_path / "scene.png"), 7, cfg.video, "c", str(tmp_path / "clip.mp4"), digest)

    assert (scene_image(request(hashlib.sha256(data).hexdigest())) == scene).all()
    (tmp_path / "scene.png").write_bytes(png_bytes(moving(seed=4)[0]))  # other pixels under the same name
    for digest in (hashlib.sha256(data).hexdigest(), ""):
        with pytest.raises(SceneMismatch, match="not animated"):
            backend.animate(request(digest))
    assert not (tmp_path / "clip.mp4").exists()
