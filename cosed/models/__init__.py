"""Model profiles and one loader per model kind (SD, video, CLIP, caption LM).

A profile is data (``cosed/profiles/*.json`` or a local folder), not a code
branch: it names where each model comes from and the generation defaults that
suit it. Every source goes through the same ``from_pretrained`` path.
"""

from cosed.models.profiles import ModelUnavailable, Profile, resolve_profile

__all__ = ["ModelUnavailable", "Profile", "resolve_profile"]
