"""Tests of the synthetic egocentric QA generator.

Answers are checked against the scene each sample was drawn from (``episode``),
and the scene against the rendered pixels, so a wrong answer cannot hide behind
a generator that is merely self-consistent.
"""

import collections
import dataclasses
import re
import time

import numpy as np
import pytest

from firstsight.data.synthetic import (
    ALL_CELLS,
    ANSWER_SPACES,
    COLOURS,
    DEFAULT_KINDS,
    DIRECTIONS,
    LETTERS,
    NOTHING,
    NUM_CHOICES,
    QUESTION_KINDS,
    SIDES,
    SKIN,
    SPLITS,
    TABLE,
    Cell,
    Hand,
    Item,
    QASample,
    Scene,
    SyntheticEgoQA,
    TableObject,
    cell_centre,
    held_centre,
    make_scene,
    object_size,
    render_scene,
    text_corpus,
    where_phrase,
)

N = 60  # samples per kind: enough to meet every case, small enough to stay fast


def episodes(kind, n=N, **kwargs):
    ds = SyntheticEgoQA(size=n, kinds=(kind,), **kwargs)
    return [ds.episode(i) for i in range(n)]


def pixel(image, point):
    x, y = point
    return image.getpixel((round(x), round(y)))


def options_of(question):
    """{letter: option text} of a multiple-choice question."""
    lines = question.split("\n")[1:]
    assert [line[:3] for line in lines] == [f"{letter}. " for letter in LETTERS]
    return {line[0]: line[3:] for line in lines}


def colour_mask(image, colour):
    return np.all(np.asarray(image) == COLOURS[colour], axis=-1)


def centroid(mask):
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean()


def object_box(cell, image_size, margin=2):
    x, y = cell_centre(cell, image_size)
    half = object_size(image_size) / 2 + margin
    return x - half, y - half, x + half, y + half


def same_sample(a: QASample, b: QASample) -> bool:
    return (
        (a.question, a.answer, a.kind, a.num_choices, a.index) == (b.question, b.answer, b.kind, b.num_choices, b.index)
        and len(a.images) == len(b.images)
        and all(x.tobytes() == y.tobytes() for x, y in zip(a.images, b.images))
    )


# ----------------------------------------------------------------- determinism


def test_same_arguments_give_identical_samples():
    a, b = SyntheticEgoQA(size=30, seed=7), SyntheticEgoQA(size=30, seed=7)
    assert all(same_sample(a[i], b[i]) for i in range(30))


def test_sample_depends_on_index_not_on_order_or_size():
    small, large = SyntheticEgoQA(size=10, seed=3), SyntheticEgoQA(size=100, seed=3)
    later_first = [small[i] for i in reversed(range(10))][::-1]
    assert all(same_sample(later_first[i], large[i]) for i in range(10))


@pytest.mark.parametrize("other", [dict(seed=1), dict(split="validation")])
def test_other_seed_or_split_gives_other_samples(other):
    base = SyntheticEgoQA(size=30, seed=0)
    changed = SyntheticEgoQA(**{"size": 30, "seed": 0, **other})
    differing = sum(not same_sample(base[i], changed[i]) for i in range(30))
    assert differing >= 27  # a few may coincide by chance (e.g. same count question), most must not


def test_text_does_not_depend_on_image_size():
    small, large = SyntheticEgoQA(size=20, image_size=56), SyntheticEgoQA(size=20, image_size=224)
    for i in range(20):
        assert (small[i].question, small[i].answer) == (large[i].question, large[i].answer)
        assert small[i].images[0].size == (56, 56) and large[i].images[0].size == (224, 224)


# ----------------------------------------------------------- sample structure


def test_samples_have_expected_shape():
    ds = SyntheticEgoQA(size=100, num_frames=3)
    for i in range(len(ds)):
        s = ds[i]
        assert s.index == i and s.kind in QUESTION_KINDS
        assert len(s.images) == (3 if s.kind == "moved" else 1)
        assert all(im.mode == "RGB" and im.size == (112, 112) for im in s.images)
        assert s.answer == s.answer.strip() and s.answer[-1].isalnum()  # short, no trailing punctuation
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.answer = "x"


def test_kinds_are_drawn_from_the_given_kinds():
    counts = collections.Counter(s.kind for s in SyntheticEgoQA(size=200))
    assert set(counts) == set(DEFAULT_KINDS) and min(counts.values()) >= 20
    assert {s.kind for s in SyntheticEgoQA(size=30, kinds=("count", "held"))} == {"count", "held"}


@pytest.mark.parametrize("kind", QUESTION_KINDS)
def test_answers_lie_in_their_answer_space(kind):
    for e in episodes(kind):
        s = e.sample
        assert s.kind == kind and s.num_choices == NUM_CHOICES[kind] == len(ANSWER_SPACES[kind])
        assert s.answer in ANSWER_SPACES[kind]
        if kind in ("held", "moved"):
            options = options_of(s.question)
            assert len(set(options.values())) == 4 and s.answer in "ABCD"


@pytest.mark.parametrize("kind", QUESTION_KINDS)
def test_answers_are_not_degenerate(kind):
    """No answer dominates, so a model cannot beat chance by always saying the same thing."""
    counts = collections.Counter(e.sample.answer for e in episodes(kind, n=120))
    assert len(counts) == len(ANSWER_SPACES[kind])
    assert max(counts.values()) / 120 < 0.5


def test_indexing_bounds_and_iteration():
    ds = SyntheticEgoQA(size=5)
    for bad in (-1, 5, 100):
        with pytest.raises(IndexError):
            ds[bad]
    assert same_sample(ds[np.int64(2)], ds[2])
    assert [s.index for s in ds] == [0, 1, 2, 3, 4]  # iteration stops at the IndexError


# --------------------------------------------------------- answers vs scene


def test_scenes_follow_the_rules():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = make_scene(rng)
        assert 1 <= len(scene.objects) <= 3
        assert len({obj.cell for obj in scene.objects}) == len(scene.objects)
        colours = [item.colour for item in scene.items]
        assert len(set(colours)) == len(colours)
        assert scene.hands and [h.side for h in scene.hands] == [s for s in SIDES if scene.hand(s)]


def test_pictures_show_the_scene():
    size = 112
    for e in episodes("count") + episodes("held"):
        image = e.sample.images[0]
        for obj in e.scene.objects:
            assert pixel(image, cell_centre(obj.cell, size)) == COLOURS[obj.item.colour]
        for cell in ALL_CELLS:
            if not e.scene.occupied(cell):
                assert pixel(image, cell_centre(cell, size)) == TABLE
        for side in SIDES:
            hand = e.scene.hand(side)
            hx, _ = held_centre(side, size)
            palm = (hx + (0.14 if side == "left" else -0.14) * size, 0.97 * size)  # palm, beside a held object
            assert pixel(image, palm) == (SKIN if hand else TABLE)
            if hand is not None and hand.holding is not None:
                assert pixel(image, held_centre(side, size)) == COLOURS[hand.holding.colour]


@pytest.mark.parametrize("image_size", [112, 224])
@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_objects_are_large_enough_for_14px_patches(image_size, shape):
    scene = Scene(objects=(TableObject(Item("red", shape), Cell(1, 0)),), hands=(Hand("left"),))
    ys, xs = np.nonzero(colour_mask(render_scene(scene, image_size), "red"))
    minimum = 22 * image_size / 112
    assert xs.max() - xs.min() + 1 >= minimum and ys.max() - ys.min() + 1 >= minimum


def test_colour_at_names_exactly_one_object_of_that_colour():
    for e in episodes("colour_at"):
        phrases = {where_phrase(c, d): c for c in ALL_CELLS for d in (True, False)}
        # The longest phrase found is the one used ("far away on your left" contains "on your left").
        where = max((p for p in phrases if p in e.sample.question), key=len)
        with_depth = where != where_phrase(phrases[where], False)
        matches = [
            obj
            for obj in e.scene.objects
            if obj.cell.column == phrases[where].column and (not with_depth or obj.cell == phrases[where])
        ]
        assert len(matches) == 1
        assert e.sample.answer == matches[0].item.colour


def test_shape_of_matches_the_object_of_that_colour():
    for e in episodes("shape_of"):
        colour = next(c for c in COLOURS if f" {c} " in e.sample.question)
        (item,) = [item for item in e.scene.items if item.colour == colour]
        assert e.sample.answer == item.noun


def test_count_counts_the_objects_on_the_table():
    for e in episodes("count"):
        assert e.sample.answer == str(len(e.scene.objects))


def test_held_has_exactly_one_correct_option():
    empty_hand_answers = 0
    for e in episodes("held", n=100):
        side = next(s for s in SIDES if f"your {s} hand" in e.sample.question)
        hand = e.scene.hand(side)
        assert hand is not None  # only hands in view are asked about
        truth = hand.holding.description if hand.holding else NOTHING
        options = options_of(e.sample.question)
        assert [letter for letter, text in options.items() if text == truth] == [e.sample.answer]
        assert NOTHING in options.values()
        empty_hand_answers += truth == NOTHING
    assert 30 <= empty_hand_answers <= 70


@pytest.mark.parametrize("num_frames", [2, 3])
def test_moved_frames_differ_only_where_the_object_moved(num_frames):
    size = 112
    for e in episodes("moved", n=40, num_frames=num_frames):
        frames, motion = e.sample.images, e.motion
        assert len(frames) == num_frames and options_of(e.sample.question) == dict(zip(LETTERS, DIRECTIONS))
        (moving,) = [obj for obj in e.scene.objects if obj.item.colour == motion.colour]
        assert moving.cell == motion.start and f"{motion.colour} {moving.item.noun}" in e.sample.question
        # Everything that changes lies within the hull of the object's start and end boxes.
        (a0, b0, a1, b1), (c0, d0, c1, d1) = object_box(motion.start, size), object_box(motion.end, size)
        x0, y0, x1, y1 = min(a0, c0), min(b0, d0), max(a1, c1), max(b1, d1)
        ys, xs = np.mgrid[:size, :size]
        outside = (xs < x0) | (xs > x1) | (ys < y0) | (ys > y1)
        for before, after in zip(frames, frames[1:]):
            changed = np.any(np.asarray(before) != np.asarray(after), axis=-1)
            assert changed.any() and not (changed & outside).any()
        # The object leaves its start cell and ends in the (empty) end cell.
        assert pixel(frames[0], cell_centre(motion.start, size)) == COLOURS[motion.colour]
        assert pixel(frames[-1], cell_centre(motion.start, size)) == TABLE
        assert pixel(frames[0], cell_centre(motion.end, size)) == TABLE
        assert pixel(frames[-1], cell_centre(motion.end, size)) == COLOURS[motion.colour]
        # Direction read off the pixels alone agrees with the answer, at every step.
        for before, after in zip(frames, frames[1:]):
            (bx, by), (ax, ay) = (centroid(colour_mask(frame, motion.colour)) for frame in (before, after))
            dx, dy = ax - bx, ay - by
            if abs(dx) > abs(dy):
                seen = "right" if dx > 0 else "left"
            else:  # down the picture is towards the wearer
                seen = "closer to you" if dy > 0 else "away from you"
            assert e.sample.answer == LETTERS[DIRECTIONS.index(seen)] == LETTERS[DIRECTIONS.index(motion.direction)]


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(split="test"), ["'test'", *SPLITS]),
        (dict(kinds=("count", "weather")), ["'weather'", "colour_at", "moved"]),
        (dict(kinds=()), ["kinds", "colour_at"]),
        (dict(kinds="count"), ["'count'", "colour_at"]),
        (dict(size=0), ["size", "0"]),
        (dict(image_size=55), ["image_size", "55", "56"]),
        (dict(num_frames=1), ["num_frames", "1"]),
        (dict(seed=-1), ["seed", "-1"]),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, named):
    with pytest.raises(ValueError) as info:
        SyntheticEgoQA(**kwargs)
    for text in named:
        assert re.search(re.escape(text), str(info.value)), (text, str(info.value))


# ------------------------------------------------------- chance, corpus, cost


def test_chance_accuracy():
    ds = SyntheticEgoQA(size=200)
    assert 0.2 <= ds.chance_accuracy() <= 0.5
    assert ds.chance_accuracy() == pytest.approx(np.mean([1 / ds[i].num_choices for i in range(200)]))
    assert SyntheticEgoQA(size=10, kinds=("moved",)).chance_accuracy() == pytest.approx(0.25)


def test_text_corpus_covers_every_word_of_generated_samples():
    corpus = SyntheticEgoQA.text_corpus()
    assert corpus == text_corpus() and len(corpus) == len(set(corpus))
    vocabulary = {word for text in corpus for word in text.split()}
    for sample in SyntheticEgoQA(size=200, seed=5):
        missing = set((sample.question + " " + sample.answer).split()) - vocabulary
        assert not missing, (sample.question, missing)


def test_generation_is_fast():
    ds = SyntheticEgoQA(size=100, seed=11)
    start = time.perf_counter()
    for i in range(100):
        ds[i]
    assert time.perf_counter() - start < 2.0  # measured ~0.05 s; generous for slow CI machines
