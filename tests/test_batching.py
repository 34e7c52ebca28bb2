"""Chat formatting and labels: only the answer and its closing <|im_end|> carry a loss."""

from __future__ import annotations

from conftest import compose
from firstsight.data.batching import IGNORE_INDEX, QACollator
from firstsight.data.synthetic import SyntheticEgoQA


def test_labels_cover_exactly_the_answer_and_end_token(cache_dir):
    from firstsight.losses import IGNORE_INDEX as LOSS_IGNORE_INDEX
    from firstsight.models import load_processor

    assert IGNORE_INDEX == LOSS_IGNORE_INDEX
    processor = load_processor(compose())
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
