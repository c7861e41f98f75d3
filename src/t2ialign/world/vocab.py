"""The public vocabulary and palette of the shapes world.

Every word a prompt may use is listed here; the renderer, the grammar and the checker all read
these tables, so changing one entry changes the whole world consistently.

- ``SHAPES``: object shapes (singular -> plural).
- ``COLORS``: object colour name -> RGB (0-255). Objects are never drawn in a background colour.
- ``BACKGROUNDS``: background colour name -> RGB (0-255).
- ``COUNT_WORDS``: number words -> count (1 to 4). ``a``/``an``/``one`` all mean 1.
- ``RELATIONS``: spatial relations between two single objects.
- ``TASKS``: the task names of prompt suites and evaluation tables (GenEval's six plus the seed
  paper's ``background`` and ``combination`` categories).
"""

from __future__ import annotations

SHAPES: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
PLURAL_TO_SHAPE: dict[str, str] = {v: k for k, v in SHAPES.items()}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (245, 225, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (125, 125, 125),
    "brown": (105, 65, 35),
}

COUNT_WORDS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
NUMBER_NAMES: dict[int, str] = {2: "two", 3: "three", 4: "four"}
MAX_COUNT = 4

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

TASKS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
    "background",
    "combination",
)

# Attribute names used by the checker's reasons and by perturbations.
ATTRIBUTES: tuple[str, ...] = ("count", "color", "shape", "background", "position")

FUNCTION_WORDS: tuple[str, ...] = ("and", "on", "background", "left", "right", "of", "above", "below")


def vocabulary() -> list[str]:
    """Every word a prompt of this world may contain, sorted."""
    words = set(COUNT_WORDS) | set(NUMBER_NAMES.values()) | set(COLORS) | set(BACKGROUNDS)
    words |= set(SHAPES) | set(SHAPES.values()) | set(FUNCTION_WORDS)
    return sorted(words)
