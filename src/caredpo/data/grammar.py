"""TwinClips sentence grammar: reference sentences of mixed specificity, with synonyms.

    generic   appearance only, the same for all 4 twins   "a red circle on the grass"
    medium    + kind of motion / event, still the same    "a red circle moves sideways over a lawn"
    specific  + direction, event, event order: tells the  "a small red circle slides to the right
              twins apart                                  over the grass and turns blue halfway"

Sentences are lower case without a final period, like MSR-VTT captions. Every choice draws from the
numpy Generator passed in, so sentences are deterministic by seed.
"""

from __future__ import annotations

import numpy as np

COLOUR_WORDS = {
    "red": ["red"],
    "green": ["green"],
    "blue": ["blue"],
    "yellow": ["yellow"],
    "orange": ["orange"],
    "purple": ["purple", "violet"],
    "white": ["white"],
    "black": ["black"],
    "pink": ["pink"],
    "cyan": ["cyan", "turquoise"],
}
SHAPE_WORDS = {
    "circle": ["circle", "disc", "ball"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle"],
    "star": ["star"],
    "diamond": ["diamond", "rhombus"],
    "hexagon": ["hexagon"],
    "cross": ["cross", "plus sign"],
    "ring": ["ring", "hoop"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
BACKGROUND_WORDS = {
    "grass": ["the grass", "a lawn", "a green field", "a grassy meadow"],
    "sand": ["the sand", "a sandy beach", "sand", "a patch of sand"],
    "water": ["the water", "a lake", "rippling water", "blue water"],
    "brick": ["a brick wall", "red bricks", "a wall of bricks"],
    "snow": ["the snow", "a snowy field", "white snow"],
    "wood": ["a wooden floor", "wooden planks", "a wooden table"],
    "asphalt": ["asphalt", "a grey road", "the pavement", "tarmac"],
    "tiles": ["a tiled floor", "checkered tiles", "a floor of tiles"],
}
STATIC_PREPS = ["on", "over", "in front of"]
MOVING_PREPS = ["over", "across", "on"]
SPEED_WORDS = {"fast": ["quickly", "rapidly", "swiftly"], "slow": ["slowly", "gently", "lazily"]}

# direction of motion -> verb phrases (specific: they tell twins apart)
MOTION_SPECIFIC = {
    "left-to-right": [
        "moves from left to right",
        "slides to the right",
        "glides rightward",
        "travels from the left side to the right side",
    ],
    "right-to-left": [
        "moves from right to left",
        "slides to the left",
        "glides leftward",
        "travels from the right side to the left side",
    ],
    "up": ["moves up", "rises", "slides upward", "travels from the bottom to the top"],
    "down": ["moves down", "falls", "slides downward", "travels from the top to the bottom"],
    "down-right": ["moves diagonally down to the right", "slides from the top left to the bottom right"],
    "up-left": ["moves diagonally up to the left", "slides from the bottom right to the top left"],
    "up-right": ["moves diagonally up to the right", "slides from the bottom left to the top right"],
    "down-left": ["moves diagonally down to the left", "slides from the top right to the bottom left"],
    "clockwise": ["circles clockwise", "moves in a clockwise circle", "goes around clockwise"],
    "anticlockwise": ["circles anticlockwise", "moves in a counterclockwise circle", "goes around counterclockwise"],
    "still": ["stays still", "sits still", "does not move", "stays in one place"],
}
# direction -> kind of motion (medium: shared by the twins of a group)
AXIS_OF = {
    "left-to-right": "horizontal",
    "right-to-left": "horizontal",
    "up": "vertical",
    "down": "vertical",
    "down-right": "diagonal",
    "up-left": "diagonal",
    "up-right": "diagonal",
    "down-left": "diagonal",
    "clockwise": "circle",
    "anticlockwise": "circle",
    "still": "still",
}
MOTION_MEDIUM = {
    "horizontal": ["moves across", "moves sideways", "moves horizontally"],
    "vertical": ["moves vertically", "moves along a vertical line", "slides vertically"],
    "diagonal": ["moves diagonally", "slides diagonally", "travels on a diagonal"],
    "circle": ["moves in a circle", "goes around in a loop", "circles around"],
    "still": MOTION_SPECIFIC["still"],
}

# event -> verb phrases of the main object ({to}, {from}, {colour}, {second}, {side} filled in)
EVENT_SPECIFIC = {
    "colour_change": [
        "turns {to} halfway",
        "changes from {from} to {to} halfway through",
        "becomes {to} in the middle",
        "switches to {to} midway",
    ],
    "grow": ["grows bigger halfway", "gets larger in the middle", "expands halfway through"],
    "shrink": ["shrinks halfway", "gets smaller in the middle", "shrinks halfway through"],
    "vanish": ["disappears halfway", "vanishes midway", "disappears in the middle"],
    "appear": ["appears halfway", "shows up midway", "only appears in the middle"],
    "enter": [
        "is joined by {second} coming in from the {side} halfway",
        "sees {second} enter from the {side} in the second half",
    ],
    "leave": ["is left alone when {second} leaves to the {side}", "sees {second} exit to the {side} in the first half"],
    "hop": ["bounces", "hops", "jumps up"],
    "blink": ["blinks", "briefly disappears", "flickers out"],
    "flash": ["flashes {colour}", "briefly turns {colour}", "glows {colour} for a moment"],
    "pulse": ["pulses", "briefly swells", "grows for a moment"],
}
ORDER = ["{x} and then {y}", "first {x}, then {y}", "{x} before it {y}", "{x}, and later {y}"]
# event -> phrases that name the kind of event only (medium: shared by the twins)
EVENT_MEDIUM = {
    "colour_change": ["changes colour", "changes its colour"],
    "grow": ["changes size", "changes its size"],
    "shrink": ["changes size", "changes its size"],
    "vanish": ["is only visible part of the time"],
    "appear": ["is only visible part of the time"],
    "enter": ["shares the scene with {second}"],
    "leave": ["shares the scene with {second}"],
}
BRIEF = {"hop", "blink", "flash", "pulse"}
SPLIT = {"generic": 0.25, "specific": 0.375}  # fraction of sentences; medium gets the rest


def _one(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _colours(f: dict) -> list[str]:
    """All colours the main object has for long (the start colour and a lasting change)."""
    return [f["colour"]] + [e["to"] for e in f["events"] if e["type"] == "colour_change"]


def _object(rng, f: dict, colour: str, size: bool) -> str:
    words = [_one(rng, SIZE_WORDS[f["size"]])] if size else []
    words += [_one(rng, COLOUR_WORDS[colour]), _one(rng, SHAPE_WORDS[f["shape"]])]
    return _article(" ".join(words))


def _second(rng, e: dict) -> str:
    return _article(f"{_one(rng, COLOUR_WORDS[e['colour']])} {_one(rng, SHAPE_WORDS[e['shape']])}")


def _fill(rng, template: str, e: dict) -> str:
    slots = {"to": e.get("to"), "from": e.get("from"), "colour": e.get("colour"), "side": e.get("side")}
    slots = {k: _one(rng, COLOUR_WORDS[v]) if v in COLOUR_WORDS else v for k, v in slots.items()}
    if "{second}" in template:
        slots["second"] = _second(rng, e)
    return template.format(**slots)


def _bg(rng, f: dict, moving: bool) -> str:
    prep = _one(rng, MOVING_PREPS if moving else STATIC_PREPS)
    return f"{prep} {_one(rng, BACKGROUND_WORDS[f['background']])}"


def generic(rng, f: dict) -> str:
    """Appearance only."""
    obj = _object(rng, f, _one(rng, _colours(f)), size=bool(rng.random() < 0.5))
    bg = _bg(rng, f, moving=False)
    templates = ["{obj} {bg}", "there is {obj} {bg}", "{obj} can be seen {bg}", "a video of {obj} {bg}"]
    return _one(rng, templates).format(obj=obj, bg=bg)


def _event_units(rng, f: dict, table: dict) -> list[str]:
    """Verb phrases for the clip's events: one per lasting event, one for the brief pair."""
    units = [_fill(rng, _one(rng, table[e["type"]]), e) for e in f["events"] if e["type"] not in BRIEF]
    brief = [e for e in f["events"] if e["type"] in BRIEF]
    if brief and table is EVENT_SPECIFIC:
        x, y = (_fill(rng, _one(rng, EVENT_SPECIFIC[e["type"]]), e) for e in brief)
        units.append(_one(rng, ORDER).format(x=x, y=y))
    elif brief:  # medium: name both, in random order, so the phrase carries no order
        x, y = (_fill(rng, _one(rng, EVENT_SPECIFIC[e["type"]]), e) for e in brief)
        units.append(f"{x} and {y}" if rng.random() < 0.5 else f"{y} and {x}")
    return units


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def medium(rng, f: dict) -> str:
    """Kind of motion and/or kind of event, nothing that tells the twins apart."""
    obj = _object(rng, f, _one(rng, _colours(f)), size=bool(rng.random() < 0.3))
    motion = _one(rng, MOTION_MEDIUM[AXIS_OF[f["motion"]]])
    bg = _bg(rng, f, moving=f["motion"] != "still")
    units = _event_units(rng, f, EVENT_MEDIUM)
    choice = int(rng.integers(3))
    if choice == 0 or not units:
        return f"{obj} {motion} {bg}"
    if choice == 1:
        return f"{obj} {motion} {bg} and {_join(units)}"
    return f"{bg}, {obj} {_join(units)}"


def specific(rng, f: dict) -> str:
    """Direction, events and their order: what tells the 4 twins apart."""
    obj = _object(rng, f, f["colour"], size=bool(rng.random() < 0.7))
    motion = _one(rng, MOTION_SPECIFIC[f["motion"]])
    if f.get("speed") and rng.random() < 0.4:
        motion = f"{_one(rng, SPEED_WORDS[f['speed']])} {motion}"
    bg = _bg(rng, f, moving=f["motion"] != "still")
    units = _event_units(rng, f, EVENT_SPECIFIC)
    if rng.random() < 0.5:
        return f"{obj} {_join([f'{motion} {bg}'] + units)}"
    return f"{bg}, {obj} {_join([motion] + units)}"


BUILDERS = {"generic": generic, "medium": medium, "specific": specific}


def describe(f: dict, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n distinct (sentence, specificity) pairs for a clip's factors, in shuffled order."""
    n_generic = max(1, round(n * SPLIT["generic"]))
    n_specific = max(1, round(n * SPLIT["specific"]))
    counts = {"generic": n_generic, "specific": n_specific, "medium": n - n_generic - n_specific}
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for spec, k in counts.items():
        for _ in range(k):
            out.append((_distinct(rng, BUILDERS[spec], f, seen), spec))
    return [out[i] for i in rng.permutation(len(out))]


def _distinct(rng, build, f: dict, seen: set[str], tries: int = 50) -> str:
    """A sentence not produced before for this clip (a repeat only if the grammar runs out)."""
    for _ in range(tries):
        s = build(rng, f)
        if s not in seen:
            break
    seen.add(s)
    return s
