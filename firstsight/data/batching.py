"""QA samples → chat-formatted model inputs with labels on the answer tokens only."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Sequence

IGNORE_INDEX = -100  # = firstsight.losses.IGNORE_INDEX (not imported: that module imports torch)


def messages_for(sample: Any, with_answer: bool = True) -> List[Dict[str, Any]]:
    """Qwen2-VL chat messages: the frames, then the question; the answer as the assistant turn."""
    content = [{"type": "image"} for _ in sample.images]
    content.append({"type": "text", "text": sample.question})
    messages = [{"role": "user", "content": content}]
    if with_answer:
        messages.append({"role": "assistant", "content": sample.answer})
    return messages


class QACollator:
    """Batches samples with the processor; labels keep only the answer tokens and the closing
    <|im_end|> (what greedy decoding must produce), everything else is IGNORE_INDEX.
    `with_index`: each batch also carries `sample_index`, the dataset index of each row (the
    teacher-logit cache looks the teacher's targets up by it; model_inputs() drops it)."""

    def __init__(self, processor: Any, with_index: bool = False):
        self.processor = processor
        self.with_index = with_index
        tokenizer = processor.tokenizer
        self.im_start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.im_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        # "assistant\n" after the last <|im_start|> opens the answer; special tokens split the text,
        # so these ids are the same in context as alone.
        self.assistant_header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]

    def __call__(self, samples: Sequence[Any]) -> Dict[str, Any]:
        texts = [self.processor.apply_chat_template(messages_for(s), tokenize=False) for s in samples]
        images = [image for s in samples for image in s.images]
        batch = self.processor(text=texts, images=images, padding=True, padding_side="right", return_tensors="pt")
        batch["labels"] = self._answer_labels(batch["input_ids"], samples)
        if self.with_index:
            batch["sample_index"] = batch["input_ids"].new_tensor([s.index for s in samples])
        return dict(batch)

    def _answer_labels(self, input_ids: Any, samples: Sequence[Any]) -> Any:
        labels = input_ids.new_full(input_ids.shape, IGNORE_INDEX)
        for row, sample in enumerate(samples):
            ids = input_ids[row].tolist()
            start = max(i for i, t in enumerate(ids) if t == self.im_start_id) + 1 + len(self.assistant_header)
            end = ids.index(self.im_end_id, start) + 1  # include <|im_end|>: the model must stop
            labels[row, start:end] = input_ids[row, start:end]
            decoded = self.processor.tokenizer.decode(ids[start:end - 1])
            if decoded != sample.answer:  # the chat template and the label span disagree: a bug, not bad data
                raise RuntimeError(f"answer span decodes to {decoded!r}, expected {sample.answer!r}")
        return labels


class PromptCollator:
    """Batches questions (no answer) ending in the assistant header, left-padded for generation."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, samples: Sequence[Any]) -> Dict[str, Any]:
        texts = [
            self.processor.apply_chat_template(messages_for(s, with_answer=False), tokenize=False, add_generation_prompt=True)
            for s in samples
        ]
        images = [image for s in samples for image in s.images]
        return dict(self.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt"))


def batches(dataset: Any, collator: QACollator, batch_size: int, seed: int, workers: int = 0) -> Iterator[Dict[str, Any]]:
    """Endless batches, reshuffled every epoch from `seed` (repeatable)."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(dataset) >= batch_size,
        collate_fn=collator,
        generator=generator,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    while True:
        yield from loader


def in_order(dataset: Any, collator: QACollator, batch_size: int) -> Iterator[Dict[str, Any]]:
    """One pass over the dataset in order (evaluation)."""
    for start in range(0, len(dataset), batch_size):
        yield collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
