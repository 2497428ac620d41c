"""Does a caption state a TwinClips clip's factors right? Direction, colour, shape, size, background.

A diagnostic, not a metric we train on: it tells *why* an arm retrieves better or worse (the
captioner names the wrong colour, never says which way the object moved, ...). Factors come from
each clip's `factors` record; a clip without a factor (a real data set) is left out of that count.

    colour / shape / size   the FIRST such word of the caption (the main object's adjective and noun:
                            later ones belong to a second object or an event, "... turns blue")
    background              the set of backgrounds named equals the clip's (synonyms count)
    motion                  the kind of motion (horizontal, vertical, diagonal, circle, still) stated
                            equals the clip's: generic ("moves sideways") or from a direction. Twins
                            share it, so a caption can be right here and still not tell them apart
    direction               the set of motion directions stated equals the clip's
    events                  the events stated, in the order stated, equal the clip's (type, and the
                            new colour of a colour change): "hops and then flashes red" is wrong for
                            a clip that flashes first. Like direction, this tells twins apart
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..data.grammar import (
    AXIS_OF,
    BACKGROUND_WORDS,
    BRIEF,
    COLOUR_WORDS,
    EVENT_SPECIFIC,
    MOTION_MEDIUM,
    SHAPE_WORDS,
    SIZE_WORDS,
)

# TwinClips motion factor -> phrases that state it (the grammar's verb phrases plus a few synonyms).
# Bare "to the left/right" is left out on purpose: the second object "leaves to the right" too.
DIRECTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left-to-right": (
        "from left to right",
        "from the left side to the right side",
        "slides to the right",
        "moves to the right",
        "glides to the right",
        "travels to the right",
        "rightward",
        "rightwards",
    ),
    "right-to-left": (
        "from right to left",
        "from the right side to the left side",
        "slides to the left",
        "moves to the left",
        "glides to the left",
        "travels to the left",
        "leftward",
        "leftwards",
    ),
    "up": ("moves up", "rises", "upward", "upwards", "from the bottom to the top", "goes up", "slides up"),
    "down": (
        "moves down",
        "falls",
        "downward",
        "downwards",
        "from the top to the bottom",
        "goes down",
        "slides down",
        "sinks",
    ),
    "down-right": ("diagonally down to the right", "from the top left to the bottom right"),
    "up-left": ("diagonally up to the left", "from the bottom right to the top left"),
    "up-right": ("diagonally up to the right", "from the bottom left to the top right"),
    "down-left": ("diagonally down to the left", "from the top right to the bottom left"),
    "clockwise": ("clockwise",),
    "anticlockwise": ("anticlockwise", "anti-clockwise", "counterclockwise", "counter-clockwise"),
    "still": (
        "stays still",
        "sits still",
        "does not move",
        "doesn't move",
        "stays in one place",
        "stationary",
        "motionless",
        "stands still",
    ),
}
# Kind of motion -> phrases that state the kind only (the grammar's medium phrases plus synonyms).
_KIND_SYNONYMS = {
    "horizontal": ("horizontally",),
    "vertical": ("vertically",),
    "diagonal": ("diagonally",),
    "circle": ("in a circle", "circles"),
}
MOTION_KIND_PHRASES: dict[str, tuple[str, ...]] = {
    kind: tuple(phrases) + _KIND_SYNONYMS.get(kind, ()) for kind, phrases in MOTION_MEDIUM.items()
}
# Background phrases, with single-word cues for the captioner's own variants ("a snowy field").
BACKGROUND_CUES: dict[str, tuple[str, ...]] = {
    name: tuple(BACKGROUND_WORDS[name]) + cues
    for name, cues in {
        "grass": ("grass", "lawn", "meadow"),
        "sand": ("sand", "beach"),
        "water": ("water", "lake"),
        "brick": ("brick",),
        "snow": ("snow",),
        "wood": ("wood",),
        "asphalt": ("asphalt", "road", "pavement", "tarmac"),
        "tiles": ("tile",),
    }.items()
}
# (phrase, direction), longest first: a matched phrase is blanked out, so "counterclockwise" is not
# also read as "clockwise"
_DIRECTION_PHRASES = sorted(((p, d) for d, ps in DIRECTION_PHRASES.items() for p in ps), key=lambda x: -len(x[0]))
_KIND_PHRASES = sorted(((p, k) for k, ps in MOTION_KIND_PHRASES.items() for p in ps), key=lambda x: -len(x[0]))
_BACKGROUND_PHRASES = [c for cues in BACKGROUND_CUES.values() for c in cues]
# factor -> (key -> words); the first word found decides
FIRST_WORD_FACTORS = {"colour": COLOUR_WORDS, "shape": SHAPE_WORDS, "size": SIZE_WORDS}
FACTORS = ("colour", "shape", "size", "background", "motion", "direction", "events")
# Slots of the grammar's event phrases -> what the caption may put there ({to}: the new colour, kept)
_SLOTS = {
    "to": r"(?P<to>[a-z]+)",
    "from": r"[a-z]+",
    "colour": r"[a-z]+",
    "side": r"[a-z]+",
    "second": r"[a-z]+(?: [a-z]+){0,4}?",
}


def _event_regex(template: str) -> re.Pattern:
    """A grammar event template ("turns {to} halfway") -> a regex over normalised captions."""
    parts = re.split(r"\{(\w+)\}", template)  # literal, slot, literal, ...
    body = "".join(_SLOTS[x] if i % 2 else re.escape(x) for i, x in enumerate(parts))
    return re.compile(rf"(?<![a-z-]){body}(?![a-z])")


# (regex, event type), longest template first, so "shrinks halfway through" wins over "shrinks halfway"
_EVENT_PATTERNS = [
    (_event_regex(t), e)
    for t, e in sorted(((t, e) for e, ts in EVENT_SPECIFIC.items() for t in ts), key=lambda x: -len(x[0]))
]
_COLOUR_OF = {w: key for key, ws in COLOUR_WORDS.items() for w in ws}


def _normal(caption: str) -> str:
    return " " + re.sub(r"[^a-z' -]+", " ", caption.lower()) + " "


def _find(text: str, phrase: str) -> re.Match | None:
    return re.search(rf"(?<![a-z-]){re.escape(phrase)}(?![a-z])", text)


def _blank(text: str, phrases: Iterable[str]) -> str:
    """Replace each phrase by ' | ', longest first, so a shorter phrase inside it is not found again."""
    for p in sorted(phrases, key=len, reverse=True):
        text = re.sub(rf"(?<![a-z-]){re.escape(p)}(?![a-z])", " | ", text)
    return text


def _take(text: str, phrases: list[tuple[str, str]]) -> tuple[set[str], str]:
    """(names of the phrases found, text with them blanked), longest phrase first."""
    found = set()
    for phrase, name in phrases:
        if _find(text, phrase):
            found.add(name)
            text = _blank(text, [phrase])
    return found, text


def stated_directions(caption: str) -> set[str]:
    """The motion directions a caption states (none, one, or contradictory several)."""
    return _take(_normal(caption), _DIRECTION_PHRASES)[0]


def stated_motion_kinds(caption: str) -> set[str]:
    """Kinds of motion a caption states: the kind of each direction it names ("rises": vertical)
    plus generic phrases in the rest ("moves horizontally")."""
    directions, rest = _take(_normal(caption), _DIRECTION_PHRASES)
    return {AXIS_OF[d] for d in directions} | _take(rest, _KIND_PHRASES)[0]


def stated_events(caption: str) -> list[tuple[str, str | None]]:
    """The events a caption states, in the order stated: (type, new colour of a colour change)."""
    text, found = _normal(caption), []
    for pattern, event in _EVENT_PATTERNS:
        for m in pattern.finditer(text):
            detail = _COLOUR_OF.get(m.group("to")) if event == "colour_change" else None
            found.append((m.start(), event, detail))
        text = pattern.sub(lambda m: " " * len(m.group(0)), text)  # blank, keeping the positions
    return [(event, detail) for _, event, detail in sorted(found)]


def events_correct(caption: str, factors: Mapping) -> bool | None:
    """True if the caption states the clip's events and no others: its lasting events (with the new
    colour of a colour change) and its brief events in the clip's order (the grammar's specific
    sentences name lasting events first, then the brief pair in order)."""
    truth = factors.get("events")
    if not truth:
        return None
    want = [(e["type"], e.get("to") if e["type"] == "colour_change" else None) for e in truth]
    said = stated_events(caption)
    brief = [e for e in want if e[0] in BRIEF]
    return (
        sorted(e for e in said if e[0] not in BRIEF) == sorted(e for e in want if e[0] not in BRIEF)
        and [e for e in said if e[0] in BRIEF] == brief
    )


def stated_backgrounds(caption: str) -> set[str]:
    text = _normal(caption)
    return {name for name, cues in BACKGROUND_CUES.items() if any(_find(text, c) for c in cues)}


def first_mention(caption: str, words: Mapping[str, list[str]]) -> str | None:
    """The factor value named first, background phrases blanked ("a green field" is not a colour)."""
    text = _blank(_normal(caption), _BACKGROUND_PHRASES)
    hits = [(m.start(), key) for key, ws in words.items() for w in ws if (m := _find(text, w))]
    return min(hits)[1] if hits else None


def direction_correct(caption: str, factors: Mapping) -> bool | None:
    """True if the caption states the clip's motion direction and no other; None if the clip's
    factors have no known direction (not a TwinClips clip)."""
    truth = factors.get("motion")
    if truth not in DIRECTION_PHRASES:
        return None
    return stated_directions(caption) == {truth}


def motion_correct(caption: str, factors: Mapping) -> bool | None:
    """True if the caption states the clip's kind of motion and no other (see the module doc)."""
    truth = factors.get("motion")
    if truth not in AXIS_OF:
        return None
    return stated_motion_kinds(caption) == {AXIS_OF[truth]}


def background_correct(caption: str, factors: Mapping) -> bool | None:
    """True if the backgrounds the caption names are exactly the clip's."""
    truth = factors.get("background")
    return None if truth not in BACKGROUND_CUES else stated_backgrounds(caption) == {truth}


# factor -> its check; colour, shape and size use the first word named (first_mention)
CHECKS = {
    "background": background_correct,
    "motion": motion_correct,
    "direction": direction_correct,
    "events": events_correct,
}


def factor_correct(caption: str, factors: Mapping, factor: str) -> bool | None:
    """Is `factor` stated right (see the module doc)? None: the clip has no such factor."""
    if factor in CHECKS:
        return CHECKS[factor](caption, factors)
    words = FIRST_WORD_FACTORS[factor]
    return None if factors.get(factor) not in words else first_mention(caption, words) == factors[factor]


def factor_scores(rows: Iterable[tuple[str, Mapping]]) -> dict[str, float | int]:
    """Percent of (caption, factors) rows stating each factor right, over the rows that have it;
    plus `n`, the number of rows."""
    rows = list(rows)
    out: dict[str, float | int] = {"n": len(rows)}
    for factor in FACTORS:
        verdicts = [v for v in (factor_correct(c, f, factor) for c, f in rows) if v is not None]
        if verdicts:
            out[factor] = round(100.0 * sum(verdicts) / len(verdicts), 1)
    return out


def direction_share(rows: Iterable[tuple[str, Mapping]]) -> tuple[float, int]:
    """(share of captions stating the right direction, number judged) over (caption, factors)."""
    verdicts = [v for v in (direction_correct(c, f) for c, f in rows) if v is not None]
    return (sum(verdicts) / len(verdicts) if verdicts else float("nan")), len(verdicts)
