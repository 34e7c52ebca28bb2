"""A teacher of another architecture, aligned with the student on the answer tokens.

Each model gets the sample through its own processor: the student's batch is what it always is,
and `PairedCollator` adds the same samples as the teacher's processor batches them under
`batch["teacher"]` (its own visual tokens, resolution and chat template, so other positions and
another length). The two tokenizers share every answer token (firstsight/models/llava_ov.py
checks it before a run is made), so the i-th answer token of a row is the same token on both
sides, and the collator checks that, row by row.

The teacher's targets are its next-token log-probabilities at the answer tokens, in the order
``(labels[:, 1:] != -100).nonzero()`` of its own labels, cut to the student's vocabulary rows and
taken at temperature T: the whole distribution, handed to the loss as `SparseTargets` with k = V
(firstsight/losses/sparse.py), which is then the chosen divergence over the full vocabulary,
exactly as KDLoss computes it on the teacher's logits when both share one sequence. Their answer
tokens travel with them and are checked against the student's batch by the loss.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch

from firstsight.data.batching import IGNORE_INDEX
from firstsight.losses.kd import answer_logit_slice
from firstsight.losses.sparse import SparseTargets, topk_targets

TEACHER = "teacher"  # the batch key of the teacher's own inputs


def answer_tokens(labels: Any) -> list:
    """Each row's answer tokens in order (what a next-token loss is taken on)."""
    shifted = labels[:, 1:]
    return [row[row != IGNORE_INDEX].tolist() for row in shifted]


class PairedCollator:
    """The student's batch of `samples`, plus the teacher's own batch of the same samples under
    `batch["teacher"]`; refuses a batch whose answer tokens differ between the two."""

    def __init__(self, student: Any, teacher: Any):
        self.student, self.teacher = student, teacher

    def __call__(self, samples: Sequence[Any]) -> Dict[str, Any]:
        batch = self.student(samples)
        teacher = self.teacher(samples)
        teacher.pop("sample_index", None)
        for row, (ours, theirs) in enumerate(zip(answer_tokens(batch["labels"]), answer_tokens(teacher["labels"]))):
            if ours != theirs:
                raise ValueError(
                    f"the answer of sample {getattr(samples[row], 'index', row)} is tokenized differently by the "
                    f"student's and the teacher's processors ({ours} vs {theirs}): token-level KD needs the same tokens"
                )
        batch[TEACHER] = teacher
        return batch


def teacher_answer_targets(
    teacher_model: Any, teacher_batch: Dict[str, Any], vocab: int, temperature: float
) -> SparseTargets:
    """The teacher's whole distribution at each answer token of its own batch (no grad): rows cut
    to the student's `vocab`, log-softmax at `temperature`, in the order of the answer tokens."""
    labels = teacher_batch["labels"]
    inputs = {k: v for k, v in teacher_batch.items() if k != "labels"}
    keep, kept = answer_logit_slice(labels)  # its output head only where an answer is predicted
    with torch.no_grad():
        logits = teacher_model(**inputs, logits_to_keep=keep, use_cache=False).logits
    shifted = kept[:, 1:]
    rows = logits[:, :-1][shifted != IGNORE_INDEX]
    _, logprobs, tail = topk_targets(rows, vocab, vocab, temperature)
    return SparseTargets(None, logprobs, tail, labels=shifted[shifted != IGNORE_INDEX])
