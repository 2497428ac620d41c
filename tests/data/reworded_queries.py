"""A query set in wording the TwinClips grammar never uses: one query per test clip of a run.

    python tests/data/reworded_queries.py runs/default-s0/data > tests/data/reworded_queries_s0.json
    caredpo eval --run runs/default-s0 --queries tests/data/reworded_queries_s0.json

Each query is written from the clip's factors (not from its grammar sentence) with phrase tables of
our own: other verbs for every direction and event ("climbs toward the top", "lights up red for an
instant"), other background nouns ("turf", "a street"), another sentence frame and other order
words ("...; after that it ..."). Colour and shape nouns stay: they are the objects' names. So a
retriever that learnt the grammar's phrases rather than what they mean scores worse here.
`test_reworded_queries_share_no_phrase_with_the_grammar` checks the claim.
"""

from __future__ import annotations

import json
import sys

DIRECTION = {
    "left-to-right": "makes its way from the left edge over to the right edge",
    "right-to-left": "makes its way from the right edge over to the left edge",
    "up": "climbs toward the top",
    "down": "drops toward the bottom",
    "down-right": "heads for the lower right corner",
    "up-left": "heads for the upper left corner",
    "up-right": "heads for the upper right corner",
    "down-left": "heads for the lower left corner",
    "clockwise": "loops around the way a clock's hands turn",
    "anticlockwise": "loops around against the way a clock's hands turn",
    "still": "holds its position",
}
EVENT = {
    "colour_change": "ends up {to} after starting out {from}",
    "grow": "swells to a larger size partway through",
    "shrink": "ends up smaller than it started",
    "vanish": "is gone for the latter part",
    "appear": "is absent at first and then pops into view",
    "enter": "is later accompanied by a {colour} {shape} arriving from the {side}",
    "leave": "starts out next to a {colour} {shape} that then departs toward the {side}",
    "hop": "does a little jump",
    "blink": "goes invisible for an instant",
    "flash": "lights up {colour} for an instant",
    "pulse": "puffs up for an instant",
}
BACKGROUND = {
    "grass": "turf",
    "sand": "sandy ground",
    "water": "a pond",
    "brick": "brickwork",
    "snow": "snowy ground",
    "wood": "timber boards",
    "asphalt": "a street",
    "tiles": "tiling",
}
SIZE = {"small": "a compact", "large": "a sizeable"}
BRIEF = {"hop", "blink", "flash", "pulse"}


def _event(e: dict) -> str:
    return EVENT[e["type"]].format(**{k: str(v).replace("_", " ") for k, v in e.items()})


def reworded(f: dict) -> str:
    """The clip's direction, lasting events, then brief events in their order."""
    lasting = [_event(e) for e in f["events"] if e["type"] not in BRIEF]
    brief = [_event(e) for e in f["events"] if e["type"] in BRIEF]
    parts = (
        [DIRECTION[f["motion"]]] + lasting + ([f"{brief[0]}; after that it {brief[1]}"] if len(brief) == 2 else brief)
    )
    subject = f"{SIZE[f['size']]} {f['colour']} {f['shape']}"
    return f"against {BACKGROUND[f['background']]}, {subject} " + ", then ".join(parts)


def reworded_queries(annotations: dict) -> dict[str, list[str]]:
    return {v["video_id"]: [reworded(v["factors"])] for v in annotations["videos"] if v["split"] == "test"}


if __name__ == "__main__":
    with open(f"{sys.argv[1]}/annotations.json", encoding="utf-8") as fh:
        print(json.dumps(reworded_queries(json.load(fh)), indent=1))
