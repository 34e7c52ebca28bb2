"""The kd loss against sparse (top-k) teacher targets, as a teacher-logit cache stores them.

A cache (firstsight/kd/teacher_cache.py) keeps, per answer token, the teacher's k most probable
token ids and their log-probabilities at temperature T over the student's vocabulary rows (the
teacher's padding rows cut away first, as KDLoss does), plus the log of the tail mass
explicitly:

    p_tail = 1 - sum_{j in top-k} p_j       stored as  log p_tail = logsumexp_{v not in top-k} log p_v

so the k+1 buckets {p_j (j in top-k), p_tail} are the teacher's distribution coarsened to a
partition of the vocabulary, and they sum to one exactly (no renormalisation of the top-k).

The student's distribution q = softmax(student_logits / T) is coarsened to the same partition:

    q_j (j in top-k),   q_tail = 1 - sum_{j in top-k} q_j = sum_{v not in top-k} q_v,

with log q_tail computed as a logsumexp of the student's log-probabilities over the ids outside
the top-k (no cancellation: exact and stable however small the tail), and the subclass's own
divergence (forward/reverse KL, JSD, skew KLs, NoKD) is applied to the two (k+1)-bucket
distributions, row by row:

    kd = mean over answer tokens of D(p_buckets, q_buckets)

By the data-processing inequality this is a lower bound of the full-vocabulary divergence for
each of these f-divergences; it equals it when k = V (every id is its own bucket and the tail
bucket is empty, so it is dropped) and tests/unit/test_teacher_cache.py checks that, value and
gradient. The CE term is exactly KDLoss's (the student's logits and the labels only), and the
total is the same alpha * T**2 * kd + (1 - alpha) * ce. The student's rows are processed in
chunks of ``chunk_size`` under activation checkpointing, as in KDLoss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from firstsight.losses.kd import KDLoss, KDLossOutput, answer_token_denominator, sum_over_chunks

__all__ = ["SparseTargets", "topk_targets", "sparse_kd_loss"]


@dataclass
class SparseTargets:
    """The teacher's top-k targets of the answer tokens of one (micro-)batch, in the order of
    ``(labels[:, 1:] != -100).nonzero()`` (row by row, position by position): N rows."""

    # [N, k] integer ids into the student's vocabulary (distinct per row); None: k = V and column j
    # is id j (the whole distribution in vocabulary order), so the loss needs no gather
    token_ids: Optional[Tensor]
    logprobs: Tensor  # [N, k] log p of those ids at temperature T
    tail_logprob: Tensor  # [N] log(1 - sum of those p); -inf when k = V (no tail)
    labels: Optional[Tensor] = None  # [N] the answer token of each row, checked against the batch's

    @property
    def num_rows(self) -> int:
        return int(self.logprobs.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.logprobs.shape[1])

    def to(self, device: Any) -> SparseTargets:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return SparseTargets(move(self.token_ids), move(self.logprobs), move(self.tail_logprob), move(self.labels))

    def kd_loss(
        self, loss_fn: Any, student_logits: Tensor, labels: Tensor, num_answer_tokens: Optional[int] = None
    ) -> Any:
        """`loss_fn`'s loss with these targets standing in for the teacher's logits (sparse_kd_loss)."""
        return sparse_kd_loss(loss_fn, student_logits, self, labels, num_answer_tokens)


def topk_targets(teacher_rows: Tensor, vocab: int, top_k: int, temperature: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(ids [N, k], log p [N, k], log p_tail [N]) of teacher logit rows [N, Vt >= vocab]: the rows
    beyond ``vocab`` (padding) are dropped, then p = softmax(rows / T), in float32 (float64 stays
    float64). The ids come sorted by decreasing probability; with ``top_k == vocab``, in
    vocabulary order (ids[:, j] = j: no sort, and a reader may drop the ids, SparseTargets)."""
    if teacher_rows.dim() != 2 or teacher_rows.shape[-1] < vocab:
        raise ValueError(f"teacher rows must be [N, >= {vocab}], got {tuple(teacher_rows.shape)}")
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must lie in [1, {vocab}] (the student's vocabulary), got {top_k}")
    dtype = torch.promote_types(teacher_rows.dtype, torch.float32)
    logits = teacher_rows[:, :vocab].to(dtype)
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = F.log_softmax(logits, dim=-1)
    if top_k == vocab:  # every id is its own bucket: nothing to select, no tail
        ids = torch.arange(vocab, device=logprobs.device).expand(logprobs.shape[0], vocab)
        return ids, logprobs, logprobs.new_full(logprobs.shape[:1], float("-inf"))
    top, ids = logprobs.topk(top_k, dim=-1)
    tail = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)
    return ids, top, tail


def sparse_kd_loss(
    loss_fn: Any,
    student_logits: Tensor,
    targets: SparseTargets,
    labels: Tensor,
    num_answer_tokens: Optional[int] = None,
) -> Any:
    """What ``loss_fn(student_logits, teacher_logits, labels, num_answer_tokens)`` computes, with
    the teacher given as top-k targets (see the module docstring); returns a KDLossOutput."""
    positions, answers = KDLoss._answer_positions(student_logits, student_logits, labels)
    num_tokens = answers.numel()
    if targets.num_rows != num_tokens:
        raise ValueError(
            f"the sparse teacher targets have {targets.num_rows} rows but the batch has {num_tokens} answer tokens"
        )
    if targets.labels is not None and num_tokens and not torch.equal(targets.labels.to(answers), answers):
        raise ValueError("the sparse teacher targets were computed for other answer tokens than this batch's")
    denominator = answer_token_denominator(num_tokens, num_answer_tokens)
    vocab = student_logits.shape[-1]
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, targets.logprobs.dtype), torch.float32)
    student_rows = student_logits[positions]
    if num_tokens == 0:
        zero = student_rows.to(dtype).sum()
        return KDLossOutput(loss=zero, kd_loss=zero.detach(), ce_loss=zero.detach(), num_tokens=0)
    dense = targets.token_ids is None  # the whole distribution in vocabulary order: a dense divergence
    if dense:
        if targets.top_k != vocab:
            raise ValueError(
                f"sparse targets without ids must cover the student's whole vocabulary ({vocab}), "
                f"they have {targets.top_k} columns"
            )
        ids = torch.zeros(num_tokens, 0, dtype=torch.long, device=student_logits.device)  # split alongside, unused
    else:
        ids = targets.token_ids.to(student_logits.device).long()
        if ids.shape[1] > vocab or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(
                f"sparse target ids must be at most {vocab} ids in [0, {vocab}) (the student's vocabulary)"
            )
    with_tail = targets.top_k < vocab  # k = V: the top-k is the whole vocabulary, the tail bucket is empty
    teacher_logprobs = targets.logprobs.detach().to(student_logits.device)
    teacher_tail = targets.tail_logprob.detach().to(student_logits.device)

    def chunk_sums(s: Tensor, i: Tensor, t: Tensor, t_tail: Tensor, y: Tensor):
        student_logprobs = F.log_softmax(loss_fn._scaled(s.to(dtype)), dim=-1)
        student_buckets = student_logprobs if dense else student_logprobs.gather(-1, i)
        teacher_buckets = t.to(dtype)
        if with_tail:
            # log sum_{v not in top-k} q_v: the masked entries get exactly zero gradient
            student_tail = torch.logsumexp(student_logprobs.scatter(-1, i, float("-inf")), dim=-1, keepdim=True)
            student_buckets = torch.cat([student_buckets, student_tail], dim=-1)
            teacher_buckets = torch.cat([teacher_buckets, t_tail.to(dtype).unsqueeze(-1)], dim=-1)
        kd = loss_fn.divergence(teacher_buckets, student_buckets).sum()
        return kd, loss_fn.ce_sum(student_logprobs, s, y, dtype)  # the CE term exactly as with full logits

    recompute = torch.is_grad_enabled() and student_rows.requires_grad
    size = loss_fn.chunk_size
    chunks = zip(
        student_rows.split(size),
        ids.split(size),
        teacher_logprobs.split(size),
        teacher_tail.split(size),
        answers.split(size),
    )
    kd_sum, ce_sum = sum_over_chunks(chunk_sums, chunks, recompute)
    return loss_fn.output(kd_sum, ce_sum, denominator, num_tokens)
