"""QA samples → chat-formatted model inputs with labels on the answer tokens only."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

IGNORE_INDEX = -100  # = firstsight.losses.kd.IGNORE_INDEX (not imported: data sits below losses)


def messages_for(sample: Any, with_answer: bool = True) -> List[Dict[str, Any]]:
    """Qwen2-VL chat messages: the frames, then the question; the answer as the assistant turn."""
    content = [{"type": "image"} for _ in sample.images]
    content.append({"type": "text", "text": sample.question})
    messages = [{"role": "user", "content": content}]
    if with_answer:
        messages.append({"role": "assistant", "content": sample.answer})
    return messages


def sample_length(
    processor: Any, question: str, answer: str, frame_sizes: Sequence[Tuple[int, int]]
) -> Tuple[int, int]:
    """(tokens, of which visual) of one sample as QACollator batches it alone (no padding): the
    chat-formatted question and answer, each frame's <|image_pad|> expanded to the visual tokens
    the image processor cuts a (width, height) frame into. Cheap: the tokenizer and the image
    processor's grid arithmetic, no pixels."""
    sample = SimpleNamespace(images=tuple(frame_sizes), question=question, answer=answer)
    text = processor.apply_chat_template(messages_for(sample), tokenize=False)
    text_tokens = len(processor.tokenizer(text)["input_ids"])  # one <|image_pad|> per frame
    image_processor = processor.image_processor
    merge = getattr(image_processor, "merge_size", 2) ** 2
    visual = sum(image_processor.get_number_of_image_patches(height, width) // merge for width, height in frame_sizes)
    return text_tokens - len(frame_sizes) + visual, visual


class QACollator:
    """Batches samples with the processor; labels keep only the answer tokens and the closing
    <|im_end|> (what greedy decoding must produce), everything else is IGNORE_INDEX.
    `with_index`: each batch also carries `sample_index`, the dataset index of each row (the
    teacher-logit cache looks the teacher's targets up by it; model_inputs() drops it).
    `pad_to_multiple_of`: rows right-padded to a multiple of that many tokens (hardware.
    pad_to_multiple_of), not only to the longest; the padding is masked and unlabelled."""

    def __init__(self, processor: Any, with_index: bool = False, pad_to_multiple_of: Optional[int] = None):
        self.processor = processor
        self.with_index = with_index
        self.padding = {"pad_to_multiple_of": pad_to_multiple_of} if pad_to_multiple_of else {}
        tokenizer = processor.tokenizer
        self.im_start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.im_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        # "assistant\n" after the last <|im_start|> opens the answer; special tokens split the text,
        # so these ids are the same in context as alone.
        self.assistant_header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]

    def __call__(self, samples: Sequence[Any]) -> Dict[str, Any]:
        texts = [self.processor.apply_chat_template(messages_for(s), tokenize=False) for s in samples]
        images = [image for s in samples for image in s.images]
        batch = self.processor(
            text=texts, images=images, padding=True, padding_side="right", return_tensors="pt", **self.padding
        )
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
            decoded = self.processor.tokenizer.decode(ids[start : end - 1])
            if decoded != sample.answer:  # the chat template and the label span disagree: a bug, not bad data
                raise RuntimeError(f"answer span decodes to {decoded!r}, expected {sample.answer!r}")
        return labels


class PromptCollator:
    """Batches questions (no answer) ending in the assistant header, left-padded for generation."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, samples: Sequence[Any]) -> Dict[str, Any]:
        texts = [
            self.processor.apply_chat_template(
                messages_for(s, with_answer=False), tokenize=False, add_generation_prompt=True
            )
            for s in samples
        ]
        images = [image for s in samples for image in s.images]
        return dict(self.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt"))


class ShuffledBatches:
    """Endless batches, reshuffled every epoch from `seed` (repeatable), whose position can be saved
    and restored: epoch e's order is a permutation drawn from its own generator seeded by (seed, e),
    so a resumed run skips the batches already taken by index, without loading or collating them.
    Data-parallel (`world_size` processes): each step's global batch is world_size × batch_size
    consecutive samples of that order and process `rank` takes its rank-th slice, so N processes
    see what one process with N times the batch size sees."""

    def __init__(
        self,
        dataset: Any,
        collator: Any,
        batch_size: int,
        seed: int,
        workers: int = 0,
        position: Optional[Dict[str, int]] = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.epoch = int(position["epoch"]) if position else 0
        self.batches_into_epoch = int(position["batches_into_epoch"]) if position else 0
        self._sampler = _EpochBatchSampler(
            len(dataset), batch_size, seed, self.epoch, self.batches_into_epoch, rank, world_size
        )
        self._loader = DataLoader(
            dataset,
            batch_sampler=self._sampler,
            collate_fn=collator,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        self._iterator = self._batches()

    def position(self) -> Dict[str, int]:
        """Where the next batch comes from: {"epoch", "batches_into_epoch"} (batches handed out, not
        merely prefetched by workers)."""
        return {"epoch": self.epoch, "batches_into_epoch": self.batches_into_epoch}

    def __iter__(self) -> ShuffledBatches:
        return self

    def __next__(self) -> Dict[str, Any]:
        return next(self._iterator)

    def _batches(self) -> Iterator[Dict[str, Any]]:
        while True:
            for batch in self._loader:
                self.batches_into_epoch += 1
                yield batch
            self.epoch += 1
            self.batches_into_epoch = 0


class _EpochBatchSampler:
    """Index batches of one epoch per iteration: epoch e is torch.randperm under a generator seeded
    by (seed, e), cut into global batches of world_size × batch_size, of which this process takes
    slice `rank`; the first epoch iterated skips `skip` batches (a resumed position)."""

    def __init__(
        self, size: int, batch_size: int, seed: int, epoch: int, skip: int, rank: int = 0, world_size: int = 1
    ):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.global_batch = rank, batch_size * world_size
        self.drop_last = size >= self.global_batch  # a dataset smaller than a batch still yields one
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.size // self.global_batch if self.drop_last else 1

    def __iter__(self) -> Iterator[List[int]]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        order = torch.randperm(self.size, generator=generator).tolist()
        skip, self.skip = self.skip, 0
        self.epoch += 1
        for index in range(skip, len(self)):
            start = index * self.global_batch + self.rank * self.batch_size
            yield order[start : start + self.batch_size]


def batches(dataset: Any, collator: Any, batch_size: int, seed: int, workers: int = 0) -> ShuffledBatches:
    """Endless batches, reshuffled every epoch from `seed` (repeatable)."""
    return ShuffledBatches(dataset, collator, batch_size, seed, workers)


def in_order(dataset: Any, collator: QACollator, batch_size: int) -> Iterator[Dict[str, Any]]:
    """One pass over the dataset in order (evaluation)."""
    for start in range(0, len(dataset), batch_size):
        yield collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
