"""Chat formatting and labels: only the answer and its closing <|im_end|> carry a loss."""

from __future__ import annotations

from conftest import compose

from firstsight.data.batching import IGNORE_INDEX, QACollator
from firstsight.data.synthetic import SyntheticEgoQA


def test_labels_cover_exactly_the_answer_and_end_token(cache_dir):
    from firstsight.losses.kd import IGNORE_INDEX as LOSS_IGNORE_INDEX
    from firstsight.models.loading import load_processor

    assert IGNORE_INDEX == LOSS_IGNORE_INDEX
    cfg = compose()
    processor = load_processor(cfg.model, cfg.cache_dir)
    dataset = SyntheticEgoQA("train", size=12, seed=1)
    samples = [dataset[i] for i in range(len(dataset))]
    batch = QACollator(processor)(samples)
    tokenizer = processor.tokenizer
    for row, sample in enumerate(samples):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(labelled) == sample.answer + "<|im_end|>"
        # images are in the input: one run of image tokens per frame
        image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert int((batch["input_ids"][row] == image_id).sum()) > 0
    assert batch["image_grid_thw"].shape[0] == sum(len(s.images) for s in samples)
    assert batch["labels"].shape == batch["input_ids"].shape


def test_sample_length_is_what_the_collator_makes_of_the_sample_alone(cache_dir):
    """data.max_length counts tokens without decoding pixels (firstsight.data.batching.sample_length,
    from the frames' stored sizes): the same count as QACollator's input_ids of the sample alone,
    for images, frame lists and a video file, at two pixel ranges, and for the synthetic data."""
    from pathlib import Path

    from firstsight.data.batching import sample_length
    from firstsight.data.files import FileQA, MediaSettings, _fitted_size, _load_media
    from firstsight.models.loading import load_processor

    cfg = compose()
    processor = load_processor(cfg.model, cfg.cache_dir)
    collate = QACollator(processor)
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    checked = 0
    for name, data_format in [
        ("conversations.jsonl", "conversations"),
        ("messages.json", "conversations"),
        ("egoschema.jsonl", "egoschema"),
    ]:
        for media in (MediaSettings(), MediaSettings(max_pixels=128 * 128, min_pixels=56 * 56, max_frames=3)):
            dataset = FileQA(fixtures / name, data_format, media=media)
            for index, record in enumerate(dataset._records):
                sizes = [
                    size
                    for item in record.media
                    for size in (
                        [f.size for f in _load_media(item, media)]
                        if item.kind == "video"
                        else [_fitted_size(s, media) for s in item.sizes]
                    )
                ]
                sample = dataset[index]
                assert sizes == [image.size for image in sample.images]  # the fitted sizes, from the headers
                expected = len(collate([sample])["input_ids"][0])
                assert sample_length(processor, sample.question, sample.answer, sizes)[0] == expected
                checked += 1
    synthetic = SyntheticEgoQA("train", size=10, seed=3)
    for sample in (synthetic[i] for i in range(len(synthetic))):
        length = sample_length(processor, sample.question, sample.answer, [im.size for im in sample.images])[0]
        assert length == len(collate([sample])["input_ids"][0])
    assert checked == 22


def test_messages_are_the_frames_then_the_question_and_the_answer_as_the_assistant_turn():
    from types import SimpleNamespace

    from firstsight.data.batching import messages_for

    sample = SimpleNamespace(images=("a", "b"), question="What is left?", answer="A cup")
    user = {
        "role": "user",
        "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is left?"}],
    }
    assert messages_for(sample) == [user, {"role": "assistant", "content": "A cup"}]
    assert messages_for(sample, with_answer=False) == [user]


def _synthetic_samples(count, seed=1):
    dataset = SyntheticEgoQA("train", size=count, seed=seed)
    return [dataset[i] for i in range(count)]


def _two_lengths(samples, processor):
    """Two samples whose QA rows differ in length (so a batch of them is padded)."""
    collate = QACollator(processor)
    by_length = {len(collate([s])["input_ids"][0]): s for s in samples}
    assert len(by_length) > 1
    return [by_length[min(by_length)], by_length[max(by_length)]]


def test_the_prompt_is_the_training_row_up_to_the_answer_left_padded(tiny_parts):
    """PromptCollator: each row, padding aside, is exactly the QACollator row of the same sample
    up to the first answer token (the chat-formatted frames and question and the assistant header,
    no answer), left-padded so that generation continues every row at the last position; the
    frames are in the batch."""
    from firstsight.data.batching import PromptCollator

    processor = tiny_parts.processor
    samples = _two_lengths(_synthetic_samples(12), processor)
    prompts = PromptCollator(processor)(samples)
    mask = prompts["attention_mask"]
    assert mask[:, -1].all() and not mask.all()  # padded, on the left
    for row, sample in enumerate(samples):
        kept = mask[row].nonzero().flatten()
        assert kept.tolist() == list(range(int(kept[0]), mask.shape[1]))
        qa = QACollator(processor)([sample])
        answer_start = int((qa["labels"][0] != IGNORE_INDEX).nonzero()[0])
        assert prompts["input_ids"][row, kept].tolist() == qa["input_ids"][0, :answer_start].tolist()
        assert processor.tokenizer.decode(prompts["input_ids"][row, kept]).endswith("<|im_start|>assistant\n")
    assert prompts["image_grid_thw"].shape[0] == sum(len(s.images) for s in samples)
    assert "pixel_values" in prompts and "labels" not in prompts


def test_qa_rows_are_right_padded_whatever_the_tokenizers_side(tiny_parts, monkeypatch):
    """QACollator pads on the right even for a tokenizer that pads on the left by default; its
    batches carry no sample_index unless asked (with_index), then the samples' dataset indices."""
    processor = tiny_parts.processor
    monkeypatch.setattr(processor.tokenizer, "padding_side", "left")
    samples = _two_lengths(_synthetic_samples(12), processor)
    batch = QACollator(processor)(samples)
    mask = batch["attention_mask"]
    assert mask[:, 0].all() and not mask.all()
    for row in range(len(samples)):
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()
    assert "sample_index" not in batch
    indexed = QACollator(processor, with_index=True)(samples)
    assert indexed["sample_index"].tolist() == [s.index for s in samples]


def test_an_answer_span_that_does_not_decode_to_the_answer_is_an_error(tiny_parts):
    """An answer holding <|im_end|> ends its label span early: the collator refuses the batch and
    says what the span decodes to against the answer."""
    import dataclasses

    import pytest

    sample = dataclasses.replace(_synthetic_samples(1)[0], answer="yes<|im_end|>no")
    with pytest.raises(RuntimeError, match=r"answer span decodes to 'yes', expected 'yes<\|im_end\|>no'"):
        QACollator(tiny_parts.processor)([sample])


def test_sample_length_follows_the_image_processors_merge_size(tiny_parts, monkeypatch):
    """The visual tokens per frame are the patches over merge_size² (Qwen2-VL's 2 when the image
    processor names none): with merge_size 1 sample_length still counts what the collator makes;
    the counts are ints."""
    from types import SimpleNamespace

    from firstsight.data.batching import sample_length

    processor = tiny_parts.processor
    samples = _synthetic_samples(4)

    def lengths(proc):
        return [sample_length(proc, s.question, s.answer, [im.size for im in s.images]) for s in samples]

    merged = lengths(processor)
    unnamed = SimpleNamespace(
        apply_chat_template=processor.apply_chat_template,
        tokenizer=processor.tokenizer,
        image_processor=SimpleNamespace(
            get_number_of_image_patches=processor.image_processor.get_number_of_image_patches
        ),
    )
    assert processor.image_processor.merge_size == 2 and lengths(unnamed) == merged
    monkeypatch.setattr(processor.image_processor, "merge_size", 1)
    unmerged = lengths(processor)
    for sample, (tokens, visual), (merged_tokens, merged_visual) in zip(samples, unmerged, merged):
        assert type(tokens) is int and type(visual) is int
        assert tokens == len(QACollator(processor)([sample])["input_ids"][0])
        assert visual == 4 * merged_visual and tokens == merged_tokens + 3 * merged_visual


# ----------------------------------------------------------------------------- batch order and position


def _rows(samples):
    """A collator that hands the samples back."""
    return list(samples)


def _epoch_order(seed, epoch, size):
    """ShuffledBatches' documented order of an epoch: randperm under (seed * 1_000_003 + epoch) mod 2^63."""
    import torch

    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(size, generator=generator).tolist()


def _take(batches, count):
    return [next(batches) for _ in range(count)]


def test_each_epoch_is_its_own_seeded_permutation_cut_into_batches():
    """10 samples, batches of 3: 3 batches an epoch (the last sample of each epoch's order is
    dropped), epoch e's order drawn from (seed, e); the position counts the batches handed out."""
    from firstsight.data.batching import ShuffledBatches

    for seed in (7, 2**62):  # seed * 1_000_003 is above 2^64 (manual_seed's limit) unless taken mod 2^63
        batches = ShuffledBatches(list(range(10)), _rows, batch_size=3, seed=seed)
        assert batches.position() == {"epoch": 0, "batches_into_epoch": 0}
        taken = _take(batches, 8)
        expected = [_epoch_order(seed, e, 10)[3 * b : 3 * b + 3] for e in range(3) for b in range(3)][:8]
        assert taken == expected
        assert batches.position() == {"epoch": 2, "batches_into_epoch": 2}
        assert iter(batches) is batches
    assert _epoch_order(7, 0, 10) != _epoch_order(7, 1, 10)


def test_a_restored_position_continues_with_the_next_batch():
    from firstsight.data.batching import ShuffledBatches

    whole = _take(ShuffledBatches(list(range(10)), _rows, batch_size=3, seed=5), 9)
    resumed = ShuffledBatches(
        list(range(10)), _rows, batch_size=3, seed=5, position={"epoch": 1, "batches_into_epoch": 2}
    )
    assert resumed.position() == {"epoch": 1, "batches_into_epoch": 2}
    assert _take(resumed, 4) == whole[5:9]
    assert resumed.position() == {"epoch": 2, "batches_into_epoch": 3}


def test_data_parallel_ranks_take_consecutive_slices_of_the_global_batch():
    """world_size 2 × batch 2: rank 0 and rank 1 together see the batches of one process with
    batch 4, rank 0 the first half of each."""
    from firstsight.data.batching import ShuffledBatches

    one = _take(ShuffledBatches(list(range(9)), _rows, batch_size=4, seed=3), 6)
    ranks = [
        _take(ShuffledBatches(list(range(9)), _rows, batch_size=2, seed=3, rank=r, world_size=2), 6) for r in (0, 1)
    ]
    assert [a + b for a, b in zip(*ranks)] == one
    default = _take(ShuffledBatches(list(range(9)), _rows, batch_size=4, seed=3), 6)
    assert default == one  # rank 0 of one process by default


def test_a_dataset_no_larger_than_a_batch_gives_one_batch_an_epoch():
    from firstsight.data.batching import ShuffledBatches, _EpochBatchSampler

    small = _take(ShuffledBatches(list(range(3)), _rows, batch_size=4, seed=1), 2)
    assert small == [_epoch_order(1, 0, 3), _epoch_order(1, 1, 3)]
    exact = _take(ShuffledBatches(list(range(4)), _rows, batch_size=4, seed=1), 2)
    assert exact == [_epoch_order(1, 0, 4), _epoch_order(1, 1, 4)]
    assert len(_EpochBatchSampler(3, 4, seed=1, epoch=0, skip=0)) == 1
    assert len(_EpochBatchSampler(9, 4, seed=1, epoch=0, skip=0)) == 2
    assert len(_EpochBatchSampler(9, 2, seed=1, epoch=0, skip=0, world_size=2)) == 2


def test_the_epoch_sampler_is_one_process_by_default():
    from firstsight.data.batching import _EpochBatchSampler

    sampler = _EpochBatchSampler(8, 2, seed=4, epoch=3, skip=1)
    order = _epoch_order(4, 3, 8)
    assert list(sampler) == [order[2:4], order[4:6], order[6:8]]  # epoch 3 without its first batch
    order = _epoch_order(4, 4, 8)
    assert list(sampler) == [order[0:2], order[2:4], order[4:6], order[6:8]]  # then epoch 4, whole


def _collated_where(samples):
    import os

    return os.getpid(), list(samples)


def test_batches_are_collated_here_or_by_persistent_workers():
    """batches() and ShuffledBatches default to no workers: collated in this process. With
    workers, a worker process collates, the same one in the next epoch (persistent workers)."""
    import os

    from firstsight.data.batching import ShuffledBatches, batches

    plain = _take(batches(list(range(6)), _collated_where, batch_size=2, seed=9), 4)
    assert [pid for pid, _ in plain] == [os.getpid()] * 4
    assert [rows for _, rows in plain] == _take(ShuffledBatches(list(range(6)), _rows, batch_size=2, seed=9), 4)
    default = _take(ShuffledBatches(list(range(6)), _collated_where, batch_size=2, seed=9), 2)
    assert [pid for pid, _ in default] == [os.getpid()] * 2
    worked = _take(ShuffledBatches(list(range(6)), _collated_where, batch_size=2, seed=9, workers=1), 4)
    pids = {pid for pid, _ in worked}
    assert len(pids) == 1 and os.getpid() not in pids
    assert [rows for _, rows in worked] == [rows for _, rows in plain]


def test_in_order_is_one_pass_in_dataset_order():
    from firstsight.data.batching import in_order

    assert list(in_order(list("abcde"), _rows, batch_size=2)) == [["a", "b"], ["c", "d"], ["e"]]
    assert list(in_order(list("abcd"), _rows, batch_size=4)) == [["a", "b", "c", "d"]]
