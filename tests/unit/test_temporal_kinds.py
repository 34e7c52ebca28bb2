"""Tests of the temporal question kinds (opt-in through data.kinds) and of what adding them left alone.

Every answer is checked against the events the sample was drawn from (``episode``) and the events
against the rendered frames, so a wrong answer cannot hide behind a self-consistent generator.
"""

import collections
import hashlib
import json

import numpy as np
import pytest

from firstsight.data.synthetic import (
    ALL_ITEMS,
    ANSWER_SPACES,
    COLOURS,
    DEFAULT_KINDS,
    DIRECTIONS,
    LETTERS,
    MIN_TEMPORAL_FRAMES,
    NUM_CHOICES,
    QUESTION_KINDS,
    TABLE,
    TEMPORAL_KINDS,
    SyntheticEgoQA,
    cell_centre,
    held_centre,
    text_corpus,
)

N = 80  # samples per kind


def episodes(kind, n=N, **kwargs):
    ds = SyntheticEgoQA(size=n, kinds=(kind,), **kwargs)
    return [ds.episode(i) for i in range(n)]


def options_of(question):
    lines = question.split("\n")[1:]
    assert [line[:3] for line in lines] == [f"{letter}. " for letter in LETTERS]
    return {line[0]: line[3:] for line in lines}


def pixel(image, point):
    x, y = point
    return image.getpixel((round(x), round(y)))


def description(colour, frames):
    """An object's option text, found in whichever frame shows it (on the table or in a hand)."""
    for state in frames:
        for item in state.items:
            if item.colour == colour:
                return item.description
    raise AssertionError(f"no {colour} object in view")


def cells(state):
    return {obj.item.colour: obj.cell for obj in state.objects}


# ------------------------------------------------------------- what must not change


def fingerprint(ds, n=50):
    digest = hashlib.sha256()
    for i in range(n):
        s = ds[i]
        digest.update(json.dumps([s.question, s.answer, s.kind, s.num_choices, s.index]).encode())
        for image in s.images:
            digest.update(image.tobytes())
    return digest.hexdigest()


# The first 50 samples as they were before the temporal kinds existed: the shipped tiny teacher was
# trained on the default kinds, so their questions, answers and pixels must never change.
BEFORE = [
    ({"seed": 0, "split": "train"}, "df21909624f60cd1feaadb316ad1a19fe296522bc87ae213c5e92eb1ee8d23cc"),
    ({"seed": 0, "split": "validation"}, "e5e413cb77c682bc8256ce99f64681873529dfafaa0243fe04efe9b2b4691345"),
    ({"seed": 1, "split": "train"}, "9180929d0fbb9365986b7eeb839f438aa25ed8efef311cab1a2d1093f9d7b67f"),
    (
        {"num_frames": 4, "seed": 0, "split": "validation"},
        "349d93a56d2d5e49e5d69afd22e64bce09106ec3fee2caf5d0cc67025bd66956",
    ),
    (
        {"image_size": 224, "seed": 0, "split": "train"},
        "6049a2bebfac4d948c0e942fcfcb621472c45df57b9496c645b60e911cd2de90",
    ),
    (
        {"kinds": ["colour_at"], "seed": 1, "split": "train"},
        "8dc036b283936660ff628cc781e0eef1d999b06953c09191f70291cbbc6c8962",
    ),
    (
        {"kinds": ["shape_of"], "seed": 1, "split": "train"},
        "421fa3712ba403557f1acfbcbe055ed25dcdcf89cd425a46a6059600dc1b41d7",
    ),
    (
        {"kinds": ["count"], "seed": 1, "split": "train"},
        "18523d00acd7a3e233fc31295fb608b6a7dc17fc6fcbec01f95c565441027c69",
    ),
    (
        {"kinds": ["held"], "seed": 1, "split": "train"},
        "1b35f6090d293b81a0026b858a2ae209bf2eb4c0ab931ee7ae8fb1c3ce3b9948",
    ),
    (
        {"kinds": ["moved"], "seed": 1, "split": "train"},
        "015ec13a78922ab574bea91b427210d6b27a141cf11eca5e345b2e164cb39bcc",
    ),
]


@pytest.mark.parametrize("settings, expected", BEFORE, ids=[json.dumps(s) for s, _ in BEFORE])
def test_default_kinds_samples_are_byte_identical_to_before(settings, expected):
    assert fingerprint(SyntheticEgoQA(size=50, **settings)) == expected


def test_default_kinds_are_the_config_default_and_the_temporal_ones_opt_in():
    from omegaconf import OmegaConf

    from firstsight.config.schema import DataConfig

    assert tuple(OmegaConf.structured(DataConfig(name="synthetic")).kinds) == DEFAULT_KINDS
    assert SyntheticEgoQA(size=1).kinds == DEFAULT_KINDS
    assert QUESTION_KINDS == DEFAULT_KINDS + TEMPORAL_KINDS and not set(DEFAULT_KINDS) & set(TEMPORAL_KINDS)


def test_tokenizer_corpus_still_has_only_the_default_kinds_text():
    """The shipped offline tokenizer was trained on text_corpus(): the temporal templates stay out of it."""
    corpus = set(text_corpus())
    for kind in TEMPORAL_KINDS:
        ds = SyntheticEgoQA(size=20, kinds=(kind,))
        assert not any(ds[i].question.split("\n")[0] in corpus for i in range(20))
    assert "0" not in corpus  # count_moved's "0" is no default answer


# ------------------------------------------------------------------- every kind


@pytest.mark.parametrize("kind", TEMPORAL_KINDS)
def test_answers_lie_in_their_space_and_are_balanced(kind):
    counts = collections.Counter()
    for e in episodes(kind, n=400, seed=3):
        s = e.sample
        assert s.kind == kind and s.num_choices == NUM_CHOICES[kind] == len(ANSWER_SPACES[kind]) == 4
        assert s.answer in ANSWER_SPACES[kind]
        if kind != "count_moved":
            assert len(set(options_of(s.question).values())) == 4
        counts[s.answer] += 1
    assert set(counts) == set(ANSWER_SPACES[kind])
    assert all(0.15 <= c / 400 <= 0.35 for c in counts.values()), counts  # uniform: 0.25 each


@pytest.mark.parametrize("kind", TEMPORAL_KINDS)
@pytest.mark.parametrize("num_frames, shown", [(2, MIN_TEMPORAL_FRAMES), (3, 3), (4, 4)])
def test_frames_show_the_states_and_differ_only_by_the_events(kind, num_frames, shown):
    size = 112
    for e in episodes(kind, n=30, num_frames=num_frames):
        frames, states, events = e.sample.images, e.frames, e.events
        assert len(frames) == len(states) == shown and states[0] == e.scene
        for image, state in zip(frames, states):
            for obj in state.objects:
                assert pixel(image, cell_centre(obj.cell, size)) == COLOURS[obj.item.colour]
            for hand in state.hands:
                if hand.holding is not None:
                    assert pixel(image, held_centre(hand.side, size)) == COLOURS[hand.holding.colour]
        for after, (before, later) in enumerate(zip(states, states[1:])):
            happened = {event.colour for event in events if event.after == after}
            moved = {c for c, cell in cells(later).items() if cells(before).get(c) != cell}
            assert moved == happened
            for event in (event for event in events if event.after == after):
                assert cells(later)[event.colour] == event.end
                if event.side is None:  # a step: one cell in its direction
                    assert cells(before)[event.colour] == event.start and event.start.step(event.direction) == event.end
                else:  # put down: it was in that hand, which is empty afterwards
                    assert before.hand(event.side).holding.colour == event.colour
                    assert later.hand(event.side).holding is None
        if not events:
            assert all(np.array_equal(np.asarray(frames[0]), np.asarray(f)) for f in frames[1:])


@pytest.mark.parametrize("kind", TEMPORAL_KINDS)
def test_same_seed_same_samples_other_seed_other_samples(kind):
    def sample_bytes(ds, i):
        s = ds[i]
        return (s.question, s.answer, tuple(im.tobytes() for im in s.images))

    a, b = SyntheticEgoQA(size=20, seed=7, kinds=(kind,)), SyntheticEgoQA(size=20, seed=7, kinds=(kind,))
    assert all(sample_bytes(a, i) == sample_bytes(b, i) for i in range(20))
    c = SyntheticEgoQA(size=20, seed=8, kinds=(kind,))
    assert sum(sample_bytes(a, i) != sample_bytes(c, i) for i in range(20)) >= 18


def test_chance_accuracy_of_temporal_and_mixed_splits():
    assert SyntheticEgoQA(size=50, kinds=TEMPORAL_KINDS).chance_accuracy() == pytest.approx(0.25)
    ds = SyntheticEgoQA(size=300, kinds=QUESTION_KINDS, num_frames=3)
    expected = np.mean([1 / len(ANSWER_SPACES[ds.kind_of(i)]) for i in range(300)])
    assert ds.chance_accuracy() == pytest.approx(expected)
    assert {ds.kind_of(i) for i in range(300)} == set(QUESTION_KINDS)


# ------------------------------------------------------------------- each kind


def test_moved_first_answer_is_the_object_that_moved_first():
    for e in episodes("moved_first"):
        first, second = e.events
        assert first.after < second.after and first.colour != second.colour
        assert first.side is None and second.side is None  # two steps on the table
        options = options_of(e.sample.question)
        assert options[e.sample.answer] == description(first.colour, e.frames)
        assert description(second.colour, e.frames) in options.values()  # the other mover is on offer


def test_which_way_answer_is_the_named_objects_direction():
    distractors = 0
    for e in episodes("which_way", n=120):
        named = next(c for c in COLOURS if f" {c} " in e.sample.question.split("\n")[0])
        assert options_of(e.sample.question) == dict(zip(LETTERS, DIRECTIONS))
        (own,) = [event for event in e.events if event.colour == named]
        assert e.sample.answer == LETTERS[DIRECTIONS.index(own.direction)]
        # the first and the last frame alone give it: one step from where it was to where it ends
        start, end = cells(e.frames[0])[named], cells(e.frames[-1])[named]
        assert start.step(own.direction) == end
        for other in (event for event in e.events if event.colour != named):
            assert other.direction != own.direction
            distractors += 1
    assert distractors >= 40  # most samples have a second object stepping another way


def test_count_moved_answer_counts_the_objects_that_changed_place():
    for e in episodes("count_moved", n=120):
        first, last = cells(e.frames[0]), cells(e.frames[-1])
        assert e.sample.answer == str(len(e.events)) == str(len({event.colour for event in e.events}))
        assert e.sample.answer == str(sum(first[c] != last[c] for c in first))
        assert all(event.side is None for event in e.events)


def test_put_down_answer_is_the_object_that_went_from_a_hand_to_the_table():
    for e in episodes("put_down", n=120):
        put = [event for event in e.events if event.side is not None]
        assert len(put) == 1
        colour = put[0].colour
        held_first = {h.holding.colour for h in e.frames[0].hands if h.holding is not None}
        held_last = {h.holding.colour for h in e.frames[-1].hands if h.holding is not None}
        assert colour in held_first and colour not in held_last and colour in cells(e.frames[-1])
        assert held_first - held_last == {colour}
        assert options_of(e.sample.question)[e.sample.answer] == description(colour, e.frames)


def test_option_texts_name_real_objects():
    texts = {item.description for item in ALL_ITEMS}
    for kind in ("moved_first", "put_down"):
        for e in episodes(kind, n=30):
            assert set(options_of(e.sample.question).values()) <= texts


def test_a_frame_with_nothing_happening_leaves_the_table_as_it_was():
    zero = [e for e in episodes("count_moved", n=120) if e.sample.answer == "0"]
    assert zero and all(not e.events for e in zero)
    for e in zero:
        first = np.asarray(e.sample.images[0])
        assert all(np.array_equal(first, np.asarray(image)) for image in e.sample.images[1:])
        occupied = list(cells(e.frames[0]).values())
        assert all(pixel(e.sample.images[0], cell_centre(c, 112)) != TABLE for c in occupied)


# -------------------------------------------------------------------- the config


def test_data_kinds_accept_the_temporal_kinds_and_refuse_unknown_ones():
    from conftest import compose

    from firstsight.core.errors import ConfigError
    from firstsight.data import synthetic_split
    from firstsight.suite.validate import validate

    cfg = compose(["data.kinds=[count,moved_first,put_down]", "data.num_frames=4"])
    validate(cfg)
    split = synthetic_split(cfg.data, "validation", 1)
    kinds = {split.kind_of(i) for i in range(40)}
    assert kinds == {"count", "moved_first", "put_down"}
    assert all(len(split[i].images) == (4 if split[i].kind != "count" else 1) for i in range(40))
    with pytest.raises(ConfigError, match="moved_after"):
        validate(compose(["data.kinds=[count,moved_after]"]))
