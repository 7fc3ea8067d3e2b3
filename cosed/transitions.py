"""How one scene's clip meets the next (`RunConfig.transitions`): the decisions, as pure functions.

- ``cut``: clips one after another (the default; today's bytes).
- ``dissolve``: the last ``transition_frames`` frames of clip *i* cross-fade into the first ones of clip
  *i+1*, in our own frame code before encoding (`cosed.video.dissolve_mp4`), so any video model can use it;
  the video is shorter by one overlap per boundary.
- ``keyframe``: clip *i* is conditioned on scene *i*'s image at its first frame and scene *i+1*'s at its
  last (LTX-Video's condition pipeline); the last scene keeps one keyframe. Clip *i* can therefore be sent
  only once scene *i+1* is chosen: one step of added latency per clip, no extra GPU-seconds.
"""

from __future__ import annotations

from cosed.config import ConfigError, RunConfig


def clips_ready(step: int, total: int, mode: str) -> list[int]:
    """The steps whose clip calls can be sent once ``step`` (of ``total``) is chosen.

    Every step's clip exactly once over steps 1..total, in step order: its own under cut and dissolve;
    the previous one's under keyframe (which waits for this step's image), and its own too at the last step.
    """
    if mode != "keyframe":
        return [step]
    return ([step - 1] if step > 1 else []) + ([step] if step == total else [])


def next_step(step: int, total: int, mode: str) -> int | None:
    """The step whose image ends ``step``'s clip (keyframe only; none for the last scene)."""
    return step + 1 if mode == "keyframe" and step < total else None


def shared_frames(overlap: int, before: int, after: int) -> int:
    """Frames a dissolve between clips of ``before`` and ``after`` frames blends: at most half of either."""
    return max(0, min(overlap, before // 2, after // 2))


def scene_starts(frames: list[int], overlap: int) -> list[int]:
    """The first frame of each scene in the joined video when consecutive clips dissolve over ``overlap``
    frames (cut: 0), as `cosed.video.dissolved` blends them."""
    starts, end = [], 0
    for index, count in enumerate(frames):
        shared = shared_frames(overlap, frames[index - 1], count) if index else 0
        starts.append(end - shared)
        end += count - shared
    return starts


def overlap_frames(cfg: RunConfig) -> int:
    """Frames each boundary shares (dissolve only)."""
    return cfg.transition_frames if cfg.transitions == "dissolve" else 0


SCENE_FROM_CLIP = ("mora", "t2v", "talc")  # methods whose scenes are frames of clips (`cosed.engine`)


def check_keyframes(profile, pipeline_name: str | None, cfg: RunConfig, capable: list[str]) -> None:
    """Refuse ``keyframe`` for a video model that takes one image only, in one line naming the profiles that can."""
    from cosed.models.adapters import supports_keyframes

    if cfg.transitions != "keyframe":
        return
    if cfg.method in SCENE_FROM_CLIP:  # their scenes come out of clips: no next scene to end on
        raise ConfigError(f"--transitions keyframe needs scenes chosen before their clips; --method {cfg.method} "
                          "makes each scene from a clip: use --transitions cut or dissolve with it")
    if profile.backend == "simulated" or supports_keyframes(pipeline_name):
        return
    raise ConfigError(f"--transitions keyframe needs a video model that takes a last frame; profile {profile.name} "
                      f"({pipeline_name}) takes one image: use --transitions dissolve, or a profile that can: "
                      f"{', '.join(capable)}")
