"""Reasoning-effort prefixes of the two official DeepSeek-V4 encoder revisions.

The "preview" encoder (V4-Flash / V4-Pro) knows ``None``/``"high"`` (no prefix) and ``"max"``
(the "Absolute maximum" text). The "0731" encoder (V4-Flash-0731, V4-Pro-0813) knows ``"low"``
(default, no prefix), ``"high"`` (the "Absolute maximum" text) and ``"max"`` (the "Beyond maximum"
text). The prefix texts below are exact: they open the prompt and key the prefix cache.
A checkpoint's own ``encoding/encoding_dsv4.py`` is only ever read as text, never imported.
"""

from __future__ import annotations

import os
from pathlib import Path

PROFILE_PREVIEW = "preview"
PROFILE_0731 = "0731"
EFFORT_PROFILES = (PROFILE_PREVIEW, PROFILE_0731)

ABSOLUTE_MAXIMUM_TEXT = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

BEYOND_MAXIMUM_TEXT = (
    "Reasoning Effort: Beyond maximum \u2014 exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: "
    "exhaustively decompose the problem into its most fundamental components, trace every causal "
    "chain to its root, and resolve the underlying cause rather than any surface symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple "
    "angles and are certain that no assumption remains unchecked and no error remains "
    "undiscovered.\n\n"
)

# effort level accepted by the encoder -> text emitted after BOS (thinking mode only)
_PREFIXES: dict[str, dict[str | None, str]] = {
    PROFILE_PREVIEW: {None: "", "high": "", "max": ABSOLUTE_MAXIMUM_TEXT},
    PROFILE_0731: {"low": "", "high": ABSOLUTE_MAXIMUM_TEXT, "max": BEYOND_MAXIMUM_TEXT},
}

# Names whose presence in a checkpoint's encoder source tells the revisions apart.
_MARKERS_0731 = ("REASONING_EFFORT_PROMPTS", "Beyond maximum")
_MARKERS_PREVIEW = ("REASONING_EFFORT_MAX",)
_MAX_SOURCE_BYTES = 1 << 20


def check_profile(profile: str) -> str:
    """Return ``profile`` if it names a known effort table, else raise ``ValueError``."""
    if profile not in _PREFIXES:
        raise ValueError(
            f"unknown reasoning-effort profile {profile!r}; use one of {EFFORT_PROFILES}"
        )
    return profile


def effort_prefix(reasoning_effort: str | None, profile: str = PROFILE_PREVIEW) -> str:
    """Validate an encoder-level effort for ``profile`` and return the text it adds.

    The text is emitted only before message 0 in thinking mode; validation applies in both modes,
    as in the reference encoders. The 0731 encoder treats ``None`` as ``"low"``.
    """
    table = _PREFIXES[check_profile(profile)]
    key = reasoning_effort
    if profile == PROFILE_0731 and not key:
        key = "low"
    if key not in table:
        allowed = [k for k in table if k is not None]
        raise ValueError(
            f"invalid reasoning_effort {reasoning_effort!r} for the {profile} encoder; "
            f"expected one of {allowed}" + (" or None" if None in table else "")
        )
    return table[key]


def detect_effort_profile_from_source(source: str) -> str:
    """Classify an ``encoding_dsv4.py`` source text as "0731" or "preview" (the default)."""
    if any(marker in source for marker in _MARKERS_0731):
        return PROFILE_0731
    if any(marker in source for marker in _MARKERS_PREVIEW):
        return PROFILE_PREVIEW
    return PROFILE_PREVIEW


def detect_effort_profile(checkpoint_dir: str | os.PathLike[str] | None) -> str:
    """Effort profile of a checkpoint, read from its ``encoding/encoding_dsv4.py`` as plain text.

    Returns "preview" when the directory or the file is absent or unreadable.
    """
    if checkpoint_dir is None:
        return PROFILE_PREVIEW
    path = Path(checkpoint_dir) / "encoding" / "encoding_dsv4.py"
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_SOURCE_BYTES)
    except OSError:
        return PROFILE_PREVIEW
    return detect_effort_profile_from_source(raw.decode("utf-8", errors="replace"))
