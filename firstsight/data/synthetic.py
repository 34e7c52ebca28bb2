"""Synthetic first-person ("egocentric") visual question answering, made on the fly.

Why synthetic: distillation experiments need data that (a) costs no download and
comes in any quantity, (b) has answers that are right by construction, so that an
accuracy number means something, and (c) is easy enough for a tiny student
(a ViT with 28 px visual tokens, a few hundred training steps) to clearly beat
chance, while still needing the image -- and for ``moved`` two frames -- to answer.

The picture is a table seen through the wearer's eyes::

    +----------------------+   wall, then a horizon line (the table's far edge)
    |  far-L  far-C  far-R |   upper half: objects far from the wearer
    | near-L near-C near-R |   lower half: objects close to the wearer
    | (hand)        (hand) |   the wearer's hands, maybe holding one object each
    +----------------------+

At 112 px each band above is one row of 28 px visual tokens, so what a question
asks about always lands in a predictable handful of tokens. Scenes are flat
colours without noise: learnability matters more here than realism.

A scene holds 1-3 objects on the table, each in its own cell of the 3x2 grid,
plus one object in each visible hand that holds something. Every object has a
unique colour, so "the red object" always names exactly one thing.

Temporal kinds (opt-in: not among the default kinds) show at least three frames
in which things happen one step at a time between consecutive frames -- an
object steps to a neighbouring cell, or a hand puts what it holds down on the
table -- and ask about the order, direction or number of those events.

Everything is deterministic: sample ``i`` of a split is drawn from
``numpy.random.default_rng([seed, split_id, i])`` and nothing else, so samples
can be generated in any order, by any worker, and always come out pixel-identical.

This module deliberately does not import torch: tokenizer training and data
inspection use it without paying for a torch import. ``SyntheticEgoQA`` is still a
valid map-style dataset for ``torch.utils.data.DataLoader`` (``__len__`` and
``__getitem__``); its samples hold PIL images, so pass a ``collate_fn``.
"""

from __future__ import annotations

import functools
import itertools
import operator
import string
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ANSWER_SPACES",
    "COLOURS",
    "COLUMNS",
    "DEFAULT_KINDS",
    "DEPTHS",
    "DIRECTIONS",
    "LETTERS",
    "NOTHING",
    "NUM_CHOICES",
    "QUESTION_KINDS",
    "SHAPES",
    "SIDES",
    "SPLITS",
    "TEMPORAL_KINDS",
    "MIN_TEMPORAL_FRAMES",
    "Cell",
    "Episode",
    "Event",
    "Hand",
    "Item",
    "Motion",
    "QASample",
    "Scene",
    "SyntheticEgoQA",
    "TableObject",
    "cell_centre",
    "held_centre",
    "make_scene",
    "object_size",
    "render_frames",
    "render_scene",
    "text_corpus",
    "where_phrase",
]

# The kinds a split is made of unless told otherwise (data.kinds' default): the shipped tiny
# teacher was trained on exactly these, so their samples must never change.
DEFAULT_KINDS: tuple[str, ...] = ("colour_at", "shape_of", "count", "held", "moved")
# Multi-frame questions about what happened when (opt-in, e.g. data.kinds for a harder split).
TEMPORAL_KINDS: tuple[str, ...] = ("moved_first", "which_way", "count_moved", "put_down")
QUESTION_KINDS: tuple[str, ...] = DEFAULT_KINDS + TEMPORAL_KINDS  # every kind that can be asked
MIN_TEMPORAL_FRAMES = 3  # a temporal question shows max(num_frames, this) frames: two events need an order
SPLITS: tuple[str, ...] = ("train", "validation")

DEFAULT_IMAGE_SIZE = 112
MIN_IMAGE_SIZE = 56  # below this objects shrink under ~11 px and stop being recognisable
MAX_TABLE_OBJECTS = 3

RGB = tuple[int, int, int]

# Saturated and far apart, so even the average colour of a 28 px token that an
# object only partly covers still says which colour it is; none is close to the
# wall, table or skin colours below.
COLOURS: Mapping[str, RGB] = MappingProxyType(
    {
        "red": (220, 30, 30),
        "green": (30, 160, 50),
        "blue": (40, 80, 230),
        "yellow": (245, 215, 0),
        "purple": (145, 50, 190),
        "orange": (255, 135, 0),
    }
)
# Drawn shape -> the everyday noun the text uses for it.
SHAPES: Mapping[str, str] = MappingProxyType({"circle": "ball", "square": "box", "triangle": "cone"})

COLUMNS: tuple[str, ...] = ("left", "centre", "right")  # relative to the wearer
DEPTHS: tuple[str, ...] = ("near", "far")  # near = lower half of the frame
SIDES: tuple[str, ...] = ("left", "right")  # the wearer's hands; the left one is on the image's left
LETTERS = "ABCD"
NOTHING = "nothing"  # the answer option for an empty hand

# A move is one step on the 3x2 grid: (change of column, change of depth index).
_DIRECTION_STEPS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {"left": (-1, 0), "right": (1, 0), "closer to you": (0, -1), "away from you": (0, 1)}
)
DIRECTIONS: tuple[str, ...] = tuple(_DIRECTION_STEPS)  # also the fixed option order of `moved`

WALL: RGB = (205, 208, 215)
HORIZON_LINE: RGB = (120, 120, 128)
TABLE: RGB = (170, 160, 145)
SKIN: RGB = (238, 190, 155)
SKIN_EDGE: RGB = (185, 135, 105)
OUTLINE: RGB = (40, 40, 40)

# Layout, in fractions of the image size. At 112 px with 28 px tokens the bands
# are token rows: 0 wall, 1 far objects, 2 near objects, 3 hands.
_HORIZON_Y = 0.16
_COLUMN_X = (1 / 6, 1 / 2, 5 / 6)
_DEPTH_Y = (0.625, 0.375)  # near, far (indexed like DEPTHS)
_OBJECT_SIZE = 0.24  # 27 px at 112: spans about two 14 px patches each way
_HAND_TOP = 0.82  # top of the palm; finger tips reach _FINGER_LENGTH higher
_FINGERS = 4
_FINGER_LENGTH = 0.04
_HAND_SPAN_X: Mapping[str, tuple[float, float]] = MappingProxyType({"left": (0.03, 0.39), "right": (0.61, 0.97)})
_HAND_CORNER = 0.09
_HELD_Y = 0.885
_HELD_SIZE = 0.20  # a bit smaller than table objects, so skin shows round a held one

# Which hands are in view. At least one always is, so `held` can always be asked
# about a hand the picture shows.
_VISIBLE_HANDS: tuple[tuple[str, ...], ...] = (("left", "right"), ("left",), ("right",))
_VISIBLE_HANDS_P = (0.6, 0.2, 0.2)
_HOLD_PROBABILITY = 0.5  # per visible hand; keeps "nothing" at about half the `held` answers

# Question kinds and the exact set of answers each can have.
ANSWER_SPACES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "colour_at": tuple(COLOURS),
        "shape_of": tuple(SHAPES.values()),
        "count": tuple(str(n) for n in range(1, MAX_TABLE_OBJECTS + 1)),
        "held": tuple(LETTERS),
        "moved": tuple(LETTERS),
        "moved_first": tuple(LETTERS),
        "which_way": tuple(LETTERS),
        "count_moved": tuple(str(n) for n in range(MAX_TABLE_OBJECTS + 1)),
        "put_down": tuple(LETTERS),
    }
)
NUM_CHOICES: Mapping[str, int] = MappingProxyType({kind: len(space) for kind, space in ANSWER_SPACES.items()})

_TEMPLATES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # "on the table" keeps a held object (also on your left, say) out of it.
        "colour_at": (
            "What colour is the object {where} on the table?",
            "On the table, what colour is the object {where}?",
        ),
        "shape_of": ("What is the {colour} object?", "What kind of object is the {colour} one?"),
        "count": ("How many objects are on the table?", "How many things are lying on the table?"),
        "held": ("What are you holding in your {side} hand?", "What is in your {side} hand?"),
        "moved": ("Which way did the {colour} {noun} move?", "In which direction did the {colour} {noun} move?"),
        "moved_first": ("Which object moved first?", "Which object was the first to move?"),
        "which_way": (
            "In which direction did the {colour} {noun} move between the first and the last frame?",
            "Between the first and the last frame, which way did the {colour} {noun} move?",
        ),
        "count_moved": ("How many objects on the table moved?", "How many objects on the table changed place?"),
        "put_down": ("Which object did you put down on the table?", "What did you put down on the table?"),
    }
)
_COLUMN_PHRASES = ("on your left", "in front of you", "on your right")  # indexed like COLUMNS
_DEPTH_PHRASES = ("close by", "far away")  # indexed like DEPTHS

_MAX_ATTEMPTS = 100  # scene redraws allowed when a question cannot be asked of a scene


# --------------------------------------------------------------------------- scene


@dataclass(frozen=True)
class Item:
    """A coloured shape. Colours are unique within a scene, so the colour names it."""

    colour: str
    shape: str

    @property
    def noun(self) -> str:
        return SHAPES[self.shape]

    @property
    def description(self) -> str:
        """How an answer option names it, e.g. "a red ball"."""
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.noun}"


ALL_ITEMS: tuple[Item, ...] = tuple(Item(colour, shape) for colour in COLOURS for shape in SHAPES)


@dataclass(frozen=True)
class Cell:
    """One cell of the 3x2 table grid, as indices into COLUMNS and DEPTHS."""

    column: int
    depth: int

    def step(self, direction: str) -> Optional[Cell]:
        """The neighbouring cell in `direction`, or None off the edge of the table."""
        d_column, d_depth = _DIRECTION_STEPS[direction]
        column, depth = self.column + d_column, self.depth + d_depth
        if 0 <= column < len(COLUMNS) and 0 <= depth < len(DEPTHS):
            return Cell(column, depth)
        return None


ALL_CELLS: tuple[Cell, ...] = tuple(Cell(c, d) for d in range(len(DEPTHS)) for c in range(len(COLUMNS)))


@dataclass(frozen=True)
class TableObject:
    item: Item
    cell: Cell


@dataclass(frozen=True)
class Hand:
    """A visible hand of the wearer; `holding` is None when it is empty."""

    side: str
    holding: Optional[Item] = None


@dataclass(frozen=True)
class Scene:
    """What one picture shows: objects on the table and the hands in view."""

    objects: tuple[TableObject, ...]
    hands: tuple[Hand, ...]  # visible hands only, in SIDES order

    @property
    def items(self) -> tuple[Item, ...]:
        """Every object in view: on the table first, then those held."""
        held = tuple(hand.holding for hand in self.hands if hand.holding is not None)
        return tuple(obj.item for obj in self.objects) + held

    def hand(self, side: str) -> Optional[Hand]:
        """The hand on `side`, or None when it is out of view."""
        return next((hand for hand in self.hands if hand.side == side), None)

    def occupied(self, cell: Cell) -> bool:
        return any(obj.cell == cell for obj in self.objects)


@dataclass(frozen=True)
class Motion:
    """The one table object that moves over the frames of a `moved` sample."""

    colour: str  # names the object: colours are unique within a scene
    direction: str
    start: Cell
    end: Cell


def make_scene(rng: np.random.Generator) -> Scene:
    """Draw a random scene: 1-3 table objects in distinct cells, hands maybe holding one each."""
    num_table = int(rng.integers(1, MAX_TABLE_OBJECTS + 1))
    visible = _VISIBLE_HANDS[int(rng.choice(len(_VISIBLE_HANDS), p=_VISIBLE_HANDS_P))]
    holding_sides = [side for side in visible if rng.random() < _HOLD_PROBABILITY]
    items = _distinct_colour_items(rng, num_table + len(holding_sides))
    cells = [ALL_CELLS[int(i)] for i in rng.choice(len(ALL_CELLS), size=num_table, replace=False)]
    held = dict(zip(holding_sides, items[num_table:]))
    return Scene(
        objects=tuple(TableObject(item, cell) for item, cell in zip(items, cells)),
        hands=tuple(Hand(side, held.get(side)) for side in visible),
    )


def _distinct_colour_items(rng: np.random.Generator, count: int) -> list[Item]:
    colours = _shuffled(list(COLOURS), rng)[:count]
    shape_names = list(SHAPES)
    return [Item(colour, shape_names[int(rng.integers(len(shape_names)))]) for colour in colours]


def _shuffled(values: Sequence, rng: np.random.Generator) -> list:
    return [values[int(i)] for i in rng.permutation(len(values))]


# ------------------------------------------------------------------ geometry + drawing

Point = tuple[float, float]


def object_size(image_size: int) -> float:
    """Width in pixels of an object on the table."""
    return _OBJECT_SIZE * image_size


def cell_centre(cell: Cell, image_size: int) -> Point:
    """Pixel (x, y) at which an object in `cell` is centred."""
    return _COLUMN_X[cell.column] * image_size, _DEPTH_Y[cell.depth] * image_size


def held_centre(side: str, image_size: int) -> Point:
    """Pixel (x, y) at which an object held in the hand on `side` is centred."""
    left, right = _HAND_SPAN_X[side]
    return (left + right) / 2 * image_size, _HELD_Y * image_size


def _line_width(image_size: int) -> int:
    return max(1, round(image_size / DEFAULT_IMAGE_SIZE))


def _draw_circle(draw: ImageDraw.ImageDraw, centre: Point, half: float, fill: RGB, width: int) -> None:
    x, y = centre
    draw.ellipse((x - half, y - half, x + half, y + half), fill=fill, outline=OUTLINE, width=width)


def _draw_square(draw: ImageDraw.ImageDraw, centre: Point, half: float, fill: RGB, width: int) -> None:
    x, y = centre
    half *= 0.88  # a square looks bigger than a circle of the same width
    draw.rectangle((x - half, y - half, x + half, y + half), fill=fill, outline=OUTLINE, width=width)


def _draw_triangle(draw: ImageDraw.ImageDraw, centre: Point, half: float, fill: RGB, width: int) -> None:
    x, y = centre
    corners = [(x, y - half), (x + half, y + half), (x - half, y + half)]
    draw.polygon(corners, fill=fill, outline=OUTLINE, width=width)


_SHAPE_DRAWERS: Mapping[str, Callable[..., None]] = MappingProxyType(
    {"circle": _draw_circle, "square": _draw_square, "triangle": _draw_triangle}
)


def _draw_item(draw: ImageDraw.ImageDraw, item: Item, centre: Point, size: float, image_size: int) -> None:
    _SHAPE_DRAWERS[item.shape](draw, centre, size / 2, COLOURS[item.colour], _line_width(image_size))


def _draw_hand(draw: ImageDraw.ImageDraw, side: str, image_size: int) -> None:
    """A palm rising from the bottom edge, four finger tips above it and a thumb towards the middle.

    Thumb and fingers are drawn first so the palm covers their roots: what shows
    is a single skin-coloured outline with bumps, which reads as a hand.
    """
    left, right = (x * image_size for x in _HAND_SPAN_X[side])
    palm_top = _HAND_TOP * image_size
    width = _line_width(image_size)
    style = {"fill": SKIN, "outline": SKIN_EDGE, "width": width}

    inner = right if side == "left" else left
    thumb_w, thumb_h = 0.06 * image_size, 0.035 * image_size
    thumb_y = palm_top + 0.08 * image_size
    draw.ellipse((inner - thumb_w, thumb_y - thumb_h, inner + thumb_w, thumb_y + thumb_h), **style)

    finger_w = (right - left) / _FINGERS
    finger_top = (_HAND_TOP - _FINGER_LENGTH) * image_size
    for i in range(_FINGERS):
        x0 = left + i * finger_w
        draw.rounded_rectangle((x0, finger_top, x0 + finger_w, palm_top + finger_w), finger_w / 2, **style)

    # The palm runs past the bottom edge so only its top corners show rounded.
    corner = _HAND_CORNER * image_size
    draw.rounded_rectangle((left, palm_top, right, image_size + corner), corner, **style)


@functools.lru_cache(maxsize=8)
def _background(image_size: int) -> Image.Image:
    """Wall, horizon and table: the same in every picture, so drawn once per size."""
    image = Image.new("RGB", (image_size, image_size), TABLE)
    draw = ImageDraw.Draw(image)
    horizon = round(_HORIZON_Y * image_size)
    draw.rectangle((0, 0, image_size - 1, horizon), fill=WALL)
    draw.line((0, horizon, image_size - 1, horizon), fill=HORIZON_LINE, width=_line_width(image_size))
    return image


def _render(scene: Scene, image_size: int, moved: Optional[tuple[str, Point]] = None) -> Image.Image:
    """Draw `scene`; `moved` = (colour, centre) puts that table object at `centre` instead of its cell."""
    image = _background(image_size).copy()
    draw = ImageDraw.Draw(image)
    size = object_size(image_size)
    for obj in scene.objects:
        if moved is not None and obj.item.colour == moved[0]:
            centre = moved[1]
        else:
            centre = cell_centre(obj.cell, image_size)
        _draw_item(draw, obj.item, centre, size, image_size)
    held_size = _HELD_SIZE * image_size
    for hand in scene.hands:
        _draw_hand(draw, hand.side, image_size)
        if hand.holding is not None:
            _draw_item(draw, hand.holding, held_centre(hand.side, image_size), held_size, image_size)
    return image


def render_scene(scene: Scene, image_size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """The RGB picture of `scene`, `image_size` px square."""
    return _render(scene, image_size)


def render_frames(
    scene: Scene, motion: Motion, num_frames: int, image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[Image.Image, ...]:
    """`num_frames` pictures in time order in which one object glides from `motion.start` to `motion.end`.

    `scene` is the state of the first frame. With more than two frames the object
    moves in equal steps, so every consecutive pair shows the same direction.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 to show a motion, got {num_frames}")
    (x0, y0), (x1, y1) = cell_centre(motion.start, image_size), cell_centre(motion.end, image_size)
    frames = []
    for t in range(num_frames):
        f = t / (num_frames - 1)
        frames.append(_render(scene, image_size, (motion.colour, (x0 + f * (x1 - x0), y0 + f * (y1 - y0)))))
    return tuple(frames)


# ------------------------------------------------------------------------ questions


@dataclass(frozen=True)
class _Question:
    text: str
    answer: str
    motion: Optional[Motion] = None


def where_phrase(cell: Cell, with_depth: bool) -> str:
    """How a question names a table cell: "on your left", or "far away on your left"."""
    column = _COLUMN_PHRASES[cell.column]
    return f"{_DEPTH_PHRASES[cell.depth]} {column}" if with_depth else column


def _template(kind: str, rng: np.random.Generator) -> str:
    templates = _TEMPLATES[kind]
    return templates[int(rng.integers(len(templates)))]


def _with_options(stem: str, options: Sequence[str]) -> str:
    return "\n".join([stem, *(_option_line(letter, option) for letter, option in zip(LETTERS, options))])


def _option_line(letter: str, option: str) -> str:
    return f"{letter}. {option}"


def _ask_colour_at(scene: Scene, rng: np.random.Generator) -> _Question:
    target = scene.objects[int(rng.integers(len(scene.objects)))]
    # Name the column alone when that is unambiguous; add the depth only when
    # the column holds two objects (cells are distinct, so that always suffices).
    shares_column = sum(obj.cell.column == target.cell.column for obj in scene.objects) > 1
    text = _template("colour_at", rng).format(where=where_phrase(target.cell, with_depth=shares_column))
    return _Question(text, target.item.colour)


def _ask_shape_of(scene: Scene, rng: np.random.Generator) -> _Question:
    items = scene.items  # held objects count too: they are in view and their colour is unique
    target = items[int(rng.integers(len(items)))]
    return _Question(_template("shape_of", rng).format(colour=target.colour), target.noun)


def _ask_count(scene: Scene, rng: np.random.Generator) -> _Question:
    # Counts objects on the table only; held objects are not on the table.
    return _Question(_template("count", rng), str(len(scene.objects)))


def _ask_held(scene: Scene, rng: np.random.Generator) -> _Question:
    hand = scene.hands[int(rng.integers(len(scene.hands)))]  # only hands in view are asked about
    correct = hand.holding.description if hand.holding is not None else NOTHING
    options = _shuffled([correct, *_held_distractors(scene, correct, rng)], rng)
    text = _with_options(_template("held", rng).format(side=hand.side), options)
    return _Question(text, LETTERS[options.index(correct)])


def _held_distractors(scene: Scene, correct: str, rng: np.random.Generator) -> list[str]:
    """Three wrong options for `held`.

    "nothing" is always on offer, so its presence gives nothing away; the others
    are other objects in view where possible, so the answer needs a look at the
    hand, not just at what is in the picture.
    """
    in_view = [item.description for item in scene.items]
    elsewhere = [item.description for item in ALL_ITEMS if item.description not in in_view]
    pool = [d for d in _shuffled(in_view, rng) if d != correct] + _shuffled(elsewhere, rng)
    fixed = [] if correct == NOTHING else [NOTHING]
    return (fixed + pool)[: len(LETTERS) - 1]


def _ask_moved(scene: Scene, rng: np.random.Generator) -> Optional[_Question]:
    """None when no table object can step in the drawn direction; the caller redraws the scene.

    The direction is drawn first (then the object), so the four answers stay equally likely.
    """
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    movable = []
    for obj in scene.objects:
        end = obj.cell.step(direction)
        if end is not None and not scene.occupied(end):
            movable.append((obj, end))
    if not movable:
        return None
    obj, end = movable[int(rng.integers(len(movable)))]
    stem = _template("moved", rng).format(colour=obj.item.colour, noun=obj.item.noun)
    # Options keep the fixed DIRECTIONS order: the answer letter then maps to a direction.
    return _Question(
        _with_options(stem, DIRECTIONS),
        LETTERS[DIRECTIONS.index(direction)],
        Motion(obj.item.colour, direction, obj.cell, end),
    )


_ASKERS: Mapping[str, Callable[[Scene, np.random.Generator], Optional[_Question]]] = MappingProxyType(
    {
        "colour_at": _ask_colour_at,
        "shape_of": _ask_shape_of,
        "count": _ask_count,
        "held": _ask_held,
        "moved": _ask_moved,
    }
)


# ------------------------------------------------------------------ temporal questions


@dataclass(frozen=True)
class Event:
    """One thing that happens between frame `after` and frame `after + 1` of a temporal question:
    a table object steps to a neighbouring cell (`direction` set), or a hand puts what it holds
    down on a free table cell (`side` set, `start` None)."""

    after: int  # the frame (0-based) it happens after
    colour: str  # the object, named by its colour (unique within a scene)
    start: Optional[Cell]  # the table cell it leaves; None for an object put down from a hand
    end: Cell  # the table cell it ends in
    direction: Optional[str] = None  # a step's direction (one of DIRECTIONS)
    side: Optional[str] = None  # the hand that put the object down


@dataclass(frozen=True)
class _Story:
    text: str
    answer: str
    frames: tuple[Scene, ...]  # the state each frame shows, in time order
    events: tuple[Event, ...]  # in the order they happen


def _apply(state: Scene, event: Event) -> Scene:
    """`state` after `event`."""
    if event.side is None:
        objects = tuple(
            TableObject(obj.item, event.end) if obj.item.colour == event.colour else obj for obj in state.objects
        )
        return Scene(objects, state.hands)
    put = state.hand(event.side).holding
    hands = tuple(Hand(hand.side) if hand.side == event.side else hand for hand in state.hands)
    return Scene(state.objects + (TableObject(put, event.end),), hands)


def _table_object(state: Scene, colour: str) -> TableObject:
    return next(obj for obj in state.objects if obj.item.colour == colour)


def _free_steps(state: Scene, colour: str) -> list[tuple[str, Cell]]:
    """(direction, end cell) of every step the table object of `colour` can take in `state`."""
    cell = _table_object(state, colour).cell
    steps = [(direction, cell.step(direction)) for direction in DIRECTIONS]
    return [(direction, end) for direction, end in steps if end is not None and not state.occupied(end)]


def _step(
    state: Scene, colour: str, after: int, rng: np.random.Generator, allowed: Sequence[str] = DIRECTIONS
) -> Optional[Event]:
    """A random step of the object of `colour` in one of the `allowed` directions, or None if it has none."""
    steps = [(direction, end) for direction, end in _free_steps(state, colour) if direction in allowed]
    if not steps:
        return None
    direction, end = steps[int(rng.integers(len(steps)))]
    return Event(after, colour, _table_object(state, colour).cell, end, direction=direction)


_Plan = Sequence[tuple[int, Callable[[Scene], Optional[Event]], bool]]


def _play(scene: Scene, plan: _Plan, num_frames: int) -> Optional[tuple[tuple[Scene, ...], tuple[Event, ...]]]:
    """Run `plan` -- (frame after which, state -> event or None, required) -- in time order (plans
    of one moment in the order given) from `scene`: the state of every frame and the events that
    happened, or None when a required event cannot happen (one that is not required is skipped)."""
    events, frames, state = [], [scene], scene
    for after in range(num_frames - 1):
        for when, make, required in plan:
            if when != after:
                continue
            event = make(state)
            if event is None:
                if required:
                    return None
                continue
            events.append(event)
            state = _apply(state, event)
        frames.append(state)
    return tuple(frames), tuple(events)


def _item_options(correct: Item, near_misses: Sequence[Item], scene: Scene, rng: np.random.Generator) -> list[str]:
    """Four shuffled object options: `correct`, then the `near_misses` (the other objects the events
    involve), then other objects in view, then objects not in view, as many as fit."""
    chosen = [correct.description] + [item.description for item in near_misses]
    in_view = [item.description for item in _shuffled(list(scene.items), rng) if item.description not in chosen]
    seen = set(chosen) | {item.description for item in scene.items}
    elsewhere = [d for d in _shuffled([item.description for item in ALL_ITEMS], rng) if d not in seen]
    return _shuffled((chosen + in_view + elsewhere)[: len(LETTERS)], rng)


def _tell_moved_first(scene: Scene, rng: np.random.Generator, num_frames: int, _: object) -> Optional[_Story]:
    """Two table objects step one after the other; which one moved first?"""
    if len(scene.objects) < 2:
        return None
    first, second = (scene.objects[int(i)] for i in rng.choice(len(scene.objects), size=2, replace=False))
    early, late = sorted(int(t) for t in rng.choice(num_frames - 1, size=2, replace=False))
    played = _play(
        scene,
        [
            (early, lambda state: _step(state, first.item.colour, early, rng), True),
            (late, lambda state: _step(state, second.item.colour, late, rng), True),
        ],
        num_frames,
    )
    if played is None:
        return None
    options = _item_options(first.item, [second.item], scene, rng)
    text = _with_options(_template("moved_first", rng), options)
    return _Story(text, LETTERS[options.index(first.item.description)], *played)


def _tell_which_way(scene: Scene, rng: np.random.Generator, num_frames: int, direction: str) -> Optional[_Story]:
    """The named object steps in `direction` at some moment; another object (where there is one)
    steps in another direction at some moment: which way did the named one go?"""
    movable = [obj for obj in scene.objects if any(d == direction for d, _ in _free_steps(scene, obj.item.colour))]
    if not movable:
        return None
    target = movable[int(rng.integers(len(movable)))]
    when = int(rng.integers(num_frames - 1))
    plan = [(when, lambda state: _step(state, target.item.colour, when, rng, allowed=(direction,)), True)]
    others = [obj for obj in scene.objects if obj is not target]
    if others:  # the distractor steps any other way; boxed in, it stays put
        other = others[int(rng.integers(len(others)))]
        other_when = int(rng.integers(num_frames - 1))
        elsewhere = tuple(d for d in DIRECTIONS if d != direction)
        plan.append(
            (other_when, lambda state: _step(state, other.item.colour, other_when, rng, allowed=elsewhere), False)
        )
    played = _play(scene, plan, num_frames)
    if played is None:
        return None
    stem = _template("which_way", rng).format(colour=target.item.colour, noun=target.item.noun)
    # Options keep the fixed DIRECTIONS order, as `moved`'s do.
    return _Story(_with_options(stem, DIRECTIONS), LETTERS[DIRECTIONS.index(direction)], *played)


def _tell_count_moved(scene: Scene, rng: np.random.Generator, num_frames: int, count: int) -> Optional[_Story]:
    """`count` distinct table objects each step once, at moments of their own: how many moved?"""
    if len(scene.objects) < count:
        return None
    movers = [scene.objects[int(i)] for i in rng.choice(len(scene.objects), size=count, replace=False)]
    plan = []
    for mover in movers:
        when = int(rng.integers(num_frames - 1))
        plan.append((when, lambda state, colour=mover.item.colour, when=when: _step(state, colour, when, rng), True))
    played = _play(scene, plan, num_frames)
    if played is None:
        return None
    return _Story(_template("count_moved", rng), str(count), *played)


def _tell_put_down(scene: Scene, rng: np.random.Generator, num_frames: int, _: object) -> Optional[_Story]:
    """A hand puts what it holds down on a free table cell at some moment; in half the samples a
    table object also steps at some moment. Which object was put down?"""
    holders = [hand for hand in scene.hands if hand.holding is not None]
    if not holders:
        return None
    hand = holders[int(rng.integers(len(holders)))]
    when = int(rng.integers(num_frames - 1))

    def put(state: Scene) -> Event:
        free = [cell for cell in ALL_CELLS if not state.occupied(cell)]  # at most 5 objects: never empty
        return Event(when, hand.holding.colour, None, free[int(rng.integers(len(free)))], side=hand.side)

    plan = [(when, put, True)]
    if scene.objects and rng.random() < 0.5:  # a table object steps too (boxed in, it stays put)
        other = scene.objects[int(rng.integers(len(scene.objects)))]
        other_when = int(rng.integers(num_frames - 1))
        plan.append((other_when, lambda state: _step(state, other.item.colour, other_when, rng), False))
    played = _play(scene, plan, num_frames)
    if played is None:
        return None
    still_held = [h.holding for h in scene.hands if h.holding is not None and h is not hand]
    options = _item_options(hand.holding, still_held, scene, rng)
    text = _with_options(_template("put_down", rng), options)
    return _Story(text, LETTERS[options.index(hand.holding.description)], *played)


# Each temporal kind: what is drawn once per sample before any scene (so that retried scenes leave
# the answers uniform), and the teller that makes a story of a scene with it, or None.
_TELLERS: Mapping[
    str,
    tuple[
        Callable[[np.random.Generator], object], Callable[[Scene, np.random.Generator, int, object], Optional[_Story]]
    ],
] = MappingProxyType(
    {
        "moved_first": (lambda rng: None, _tell_moved_first),
        "which_way": (lambda rng: DIRECTIONS[int(rng.integers(len(DIRECTIONS)))], _tell_which_way),
        "count_moved": (lambda rng: int(rng.integers(MAX_TABLE_OBJECTS + 1)), _tell_count_moved),
        "put_down": (lambda rng: None, _tell_put_down),
    }
)
assert set(_TELLERS) == set(TEMPORAL_KINDS) and not set(_TELLERS) & set(_ASKERS)


# -------------------------------------------------------------------------- corpus

_SLOT_VALUES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "where": tuple(dict.fromkeys(where_phrase(c, d) for c in ALL_CELLS for d in (False, True))),
        "colour": tuple(COLOURS),
        "noun": tuple(SHAPES.values()),
        "side": SIDES,
    }
)


def _fill_every_way(template: str) -> Iterator[str]:
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    for values in itertools.product(*(_SLOT_VALUES[name] for name in fields)):
        yield template.format(**dict(zip(fields, values)))


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    # The default kinds' text only: the shipped offline tokenizer (firstsight/models/tiny.py) was trained on
    # exactly this corpus. The temporal kinds' words are byte-level encodable all the same.
    stems = (text for kind in DEFAULT_KINDS for t in _TEMPLATES[kind] for text in _fill_every_way(t))
    option_texts = [NOTHING, *(item.description for item in ALL_ITEMS), *DIRECTIONS]
    options = (_option_line(letter, text) for letter in LETTERS for text in option_texts)
    answers = (answer for kind in DEFAULT_KINDS for answer in ANSWER_SPACES[kind])
    return tuple(dict.fromkeys(itertools.chain(stems, options, answers)))


def text_corpus() -> list[str]:
    """Every phrase questions and answers of the default kinds are made of: all templates
    filled with all values, every option line and every answer. Meant for training a tokenizer
    offline; a generated question is these stems and option lines joined by newlines."""
    return list(_corpus())


# ------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class QASample:
    images: tuple[Image.Image, ...]  # one image, or frames in time order (`moved`, temporal kinds)
    question: str
    answer: str  # the exact answer text: a word, a number or a letter
    kind: str
    num_choices: int  # size of the answer space, for chance accuracy
    index: int  # position in its split


@dataclass(frozen=True)
class Episode:
    """A sample with the ground truth it was made from, for tests and debugging."""

    sample: QASample
    scene: Scene  # for `moved` and the temporal kinds: the state shown in the first frame
    motion: Optional[Motion]  # set for `moved` only
    frames: tuple[Scene, ...] = ()  # temporal kinds: the state each frame shows
    events: tuple[Event, ...] = ()  # temporal kinds: what happened between the frames, in order


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


def _check_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


class SyntheticEgoQA:
    """Map-style dataset of synthetic egocentric QA samples, rendered on demand.

    Sample `i` depends only on (seed, split, i, image_size, num_frames, kinds);
    the two splits use different random streams. The question kind of each sample
    is drawn uniformly from `kinds` (default: DEFAULT_KINDS; TEMPORAL_KINDS are
    opt-in and show max(num_frames, MIN_TEMPORAL_FRAMES) frames).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 512,
        seed: int = 0,
        image_size: int = DEFAULT_IMAGE_SIZE,
        num_frames: int = 2,
        kinds: Sequence[str] = DEFAULT_KINDS,
    ) -> None:
        _check_choice("split", split, SPLITS)
        if isinstance(kinds, str):  # a lone string would be read as a sequence of letters
            raise ValueError(
                f"kinds must be a sequence of kind names, not the string {kinds!r}; "
                f"valid choices: {', '.join(QUESTION_KINDS)}"
            )
        kinds = tuple(kinds)
        if not kinds:
            raise ValueError(f"kinds must not be empty; valid choices: {', '.join(QUESTION_KINDS)}")
        for kind in kinds:
            _check_choice("kind", kind, QUESTION_KINDS)
        size, seed, image_size, num_frames = map(operator.index, (size, seed, image_size, num_frames))
        _check_at_least("size", size, 1)
        _check_at_least("seed", seed, 0)  # numpy seed sequences take non-negative integers only
        _check_at_least("image_size", image_size, MIN_IMAGE_SIZE)
        _check_at_least("num_frames", num_frames, 2)
        self.split = split
        self.size = size
        self.seed = seed
        self.image_size = image_size
        self.num_frames = num_frames
        self.kinds = kinds
        self._chance: Optional[float] = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, size={self.size}, seed={self.seed}, "
            f"image_size={self.image_size}, num_frames={self.num_frames}, kinds={self.kinds})"
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> QASample:
        return self.episode(index).sample

    def _start(self, index: int) -> tuple[np.random.Generator, str]:
        """The sample's own random stream, and its kind (always the stream's first draw)."""
        index = operator.index(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a split of {self.size} samples")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        return rng, self.kinds[int(rng.integers(len(self.kinds)))]

    def kind_of(self, index: int) -> str:
        """The question kind of sample `index`, without rendering it."""
        return self._start(index)[1]

    def episode(self, index: int) -> Episode:
        """Sample `index` together with its scene and motion."""
        rng, kind = self._start(index)
        if kind in _TELLERS:
            return self._temporal_episode(index, rng, kind)
        ask = _ASKERS[kind]
        for _ in range(_MAX_ATTEMPTS):
            scene = make_scene(rng)
            question = ask(scene, rng)
            if question is not None:
                break
        else:  # pragma: no cover - every kind but `moved` always succeeds, and `moved` fails rarely
            raise RuntimeError(f"could not make a {kind!r} question for sample {index}")
        if question.motion is not None:
            images = render_frames(scene, question.motion, self.num_frames, self.image_size)
        else:
            images = (render_scene(scene, self.image_size),)
        sample = QASample(images, question.text, question.answer, kind, NUM_CHOICES[kind], operator.index(index))
        return Episode(sample, scene, question.motion)

    def _temporal_episode(self, index: int, rng: np.random.Generator, kind: str) -> Episode:
        draw, tell = _TELLERS[kind]
        num_frames = max(self.num_frames, MIN_TEMPORAL_FRAMES)
        drawn = draw(rng)
        for _ in range(_MAX_ATTEMPTS):
            scene = make_scene(rng)
            story = tell(scene, rng, num_frames, drawn)
            if story is not None:
                break
        else:  # pragma: no cover - each teller succeeds on a good share of scenes
            raise RuntimeError(f"could not make a {kind!r} question for sample {index}")
        images = tuple(render_scene(state, self.image_size) for state in story.frames)
        sample = QASample(images, story.text, story.answer, kind, NUM_CHOICES[kind], operator.index(index))
        return Episode(sample, scene, None, story.frames, story.events)

    def chance_accuracy(self) -> float:
        """Mean over the split of 1/num_choices: the accuracy of uniform guessing."""
        if self._chance is None:
            self._chance = float(np.mean([1 / NUM_CHOICES[self.kind_of(i)] for i in range(self.size)]))
        return self._chance

    @staticmethod
    def text_corpus() -> list[str]:
        """See the module-level `text_corpus`."""
        return text_corpus()
