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
