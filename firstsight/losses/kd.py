"""Knowledge-distillation losses for distilling a Qwen2-VL teacher into a smaller student.

Notation (used in every docstring below): over the vocabulary shared by both models,

    p = softmax(teacher_logits / T)      (teacher)
    q = softmax(student_logits / T)      (student)

Only *answer tokens* carry a loss: positions whose label is not ``IGNORE_INDEX`` (-100).
As usual for causal LMs, ``logits[:, :-1]`` predict ``labels[:, 1:]``, so ``labels[:, 0]``
and the logits of the last position never enter the loss.

Every loss here returns

    loss = alpha * T**2 * kd + (1 - alpha) * ce

where ``kd`` is the mean over answer tokens of the per-token divergence between p and q
(the subclass picks which one) and ``ce`` is the student's ordinary cross-entropy at
temperature 1 on the same tokens, averaged the same way. The T**2 factor (Hinton et al.,
2015) keeps the size of the kd gradients roughly independent of T.

Memory: with Qwen2-VL's vocabulary (V = 151936), fp32 log-probabilities of every token of a
batch would dwarf the model activations. We therefore gather the answer-token rows only,
and run the per-token work in chunks of ``chunk_size`` rows, each under activation
checkpointing, so that at most one chunk's fp32 temporaries (a few ``chunk_size x V``
tensors) are alive at any time, in the forward and in the backward pass alike. What remains
is in the logits' own dtype: the gathered student rows [N, V] and, in backward, their
gradient (about three [N, V] tensors at its peak, before it is scattered back into the
[B, L, V] gradient of the logits). The teacher's rows are gathered chunk by chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "IGNORE_INDEX",
    "KDLossOutput",
    "KDLoss",
    "ForwardKL",
    "ReverseKL",
    "JSD",
    "SkewForwardKL",
    "SkewReverseKL",
    "NoKD",
    "count_answer_tokens",
    "answer_logit_slice",
    "HIDDEN_LOSS_KINDS",
    "HiddenStateLoss",
    "HiddenDistillation",
    "hidden_layer_pairs",
]

IGNORE_INDEX = -100


def sum_over_chunks(chunk_sums, chunks, recompute: bool):
    """(Σ kd, Σ ce) of `chunk_sums(*args)` over `chunks`; with `recompute` each chunk runs under
    activation checkpointing, so only one chunk's fp32 temporaries exist at a time in backward."""
    kd_sum = ce_sum = None
    for args in chunks:
        if recompute:  # no randomness inside, so there is no RNG state to preserve
            kd, ce = checkpoint(chunk_sums, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            kd, ce = chunk_sums(*args)
        kd_sum = kd if kd_sum is None else kd_sum + kd
        ce_sum = ce if ce_sum is None else ce_sum + ce
    return kd_sum, ce_sum


def answer_token_denominator(num_tokens: int, num_answer_tokens: Optional[int]) -> int:
    """What a micro-batch's sums are divided by: the answer-token count of the whole accumulated
    batch (so micro-batch losses add up to the batch mean), or this micro-batch's own count."""
    if num_answer_tokens is None:
        return num_tokens
    denominator = int(num_answer_tokens)
    if denominator < num_tokens:
        raise ValueError(
            f"num_answer_tokens={denominator} is smaller than this micro-batch's "
            f"{num_tokens} answer tokens; pass the count of the whole accumulated batch"
        )
    return denominator


@dataclass
class KDLossOutput:
    """What :class:`KDLoss` returns.

    ``kd_loss`` and ``ce_loss`` are normalised exactly like ``loss`` (divided by
    ``num_answer_tokens`` when given), so summing them over the micro-batches of an
    accumulated batch gives that batch's averages. They are detached: they are for logging.
    """

    loss: Tensor  # alpha * T**2 * kd_loss + (1 - alpha) * ce_loss, differentiable
    kd_loss: Tensor  # the divergence term, before alpha and T**2 (detached)
    ce_loss: Tensor  # the student's cross-entropy at T = 1 (detached)
    num_tokens: int  # answer tokens in this (micro-)batch


def count_answer_tokens(labels: Tensor) -> int:
    """Number of positions that carry a loss: ``(labels[:, 1:] != IGNORE_INDEX).sum()``.

    ``labels[:, 0]`` is excluded because no logit predicts it (the shift by one). Sum this
    over the micro-batches of an accumulated batch and pass the total to
    :meth:`KDLoss.forward` as ``num_answer_tokens``.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq_len], got shape {tuple(labels.shape)}")
    return int((labels[:, 1:] != IGNORE_INDEX).sum().item())


def answer_logit_slice(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Where logits are needed, for ``logits_to_keep``: ``(keep [U+1], kept_labels [B, U+1])``.

    ``keep`` holds the sorted positions p whose logits predict an answer token in some row
    (``labels[b, p + 1] != IGNORE_INDEX``), then one more position (p_last + 1, whose logits
    predict nothing), and ``kept_labels[:, j + 1] = labels[:, keep[j] + 1]``, with
    ``kept_labels[:, 0] = IGNORE_INDEX``. So ``loss(logits[:, keep], ..., kept_labels)`` with the
    usual shift is the loss of the full logits, term for term and in the same order, while the
    output head runs on U + 1 positions instead of L (the [B, L, V] logits are never made).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq_len], got shape {tuple(labels.shape)}")
    positions = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    last = positions[-1:] + 1 if positions.numel() else positions.new_full((1,), labels.shape[1] - 1)
    keep = torch.cat([positions, last])
    kept_labels = torch.cat([labels.new_full((labels.shape[0], 1), IGNORE_INDEX), labels[:, positions + 1]], dim=1)
    return keep, kept_labels


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Row-wise KL(a||b) = sum_v a_v (log a_v - log b_v), from log-probabilities [N, V] -> [N].

    Expects finite logits (as language models produce): a -inf logit would give 0 * inf = nan.
    """
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def _mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1−w)·b) from log-probabilities, by logaddexp: exact and stable in log space.
    At the ends the mixture is one of the two exactly; taking it directly avoids log(0) = -inf."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _check_fraction(name: str, value: float) -> None:
    # `not (0 <= x <= 1)` rather than `x < 0 or x > 1` so that NaN is rejected too.
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


class KDLoss(torch.nn.Module):
    """Base class: alpha/T mixing, shift, masking, vocabulary cut, chunking, normalisation.

    ``loss = alpha * T**2 * mean_tokens(divergence(log p, log q)) + (1 - alpha) * mean_tokens(CE)``

    Subclasses define only :meth:`divergence`, the per-token divergence.

    Args:
        temperature: T > 0, applied to teacher and student logits for the kd term only.
        alpha: weight of the kd term, in [0, 1]; ``1 - alpha`` weights the cross-entropy.
        chunk_size: answer-token rows processed at once (>= 1). The fp32 temporaries of the
            loss are a few ``chunk_size x V`` tensors (V = student vocabulary).
    """

    uses_teacher = True  # False: the divergence ignores the teacher, whose forward can be skipped

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, chunk_size: int = 1024):
        super().__init__()
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        _check_fraction("alpha", alpha)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, chunk_size={self.chunk_size}"

    def divergence(self, teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
        """Per-token divergence [N] from log p and log q at temperature T, both [N, V]."""
        raise NotImplementedError(f"{type(self).__name__} must implement divergence()")

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor,
        num_answer_tokens: int | None = None,
    ) -> KDLossOutput:
        """Compute the loss of one (micro-)batch.

        Args:
            student_logits: [B, L, Vs], any float dtype (bf16/fp16 under mixed precision).
            teacher_logits: [B, L, Vt] with Vt >= Vs; rows beyond Vs (the teacher's padding
                rows) are dropped. It is a fixed target: no gradient flows into it. Or the
                teacher's top-k targets from a teacher-logit cache (``SparseTargets``): the
                same divergence on k+1 buckets (firstsight/losses/sparse.py).
            labels: [B, L] token ids, ``IGNORE_INDEX`` where no loss is wanted.
            num_answer_tokens: the number of answer tokens of the whole accumulated batch
                (see :func:`count_answer_tokens`). Sums over this micro-batch are divided by
                it, so summing the micro-batch losses gives the average over the accumulated
                batch. ``None``: divide by this micro-batch's own count.

        The arithmetic runs in float32, or float64 when an input is float64. A micro-batch
        without answer tokens returns zeros that are still connected to the graph, so that
        ``backward()`` works on every rank/micro-batch alike.
        """
        if not isinstance(teacher_logits, Tensor):  # SparseTargets of the teacher-logit cache compute their own
            return teacher_logits.kd_loss(self, student_logits, labels, num_answer_tokens)
        positions, targets = self._answer_positions(student_logits, teacher_logits, labels)
        num_tokens = targets.numel()
        denominator = answer_token_denominator(num_tokens, num_answer_tokens)

        # float32 at least, whatever comes in; float64 stays float64.
        dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
        # The student's answer rows are gathered once, in their input dtype: gathering per
        # chunk would scatter each chunk's gradient into its own full-size zero tensor.
        student_rows = student_logits[positions]
        # The teacher is a fixed target. Its rows are gathered per chunk instead (it needs no
        # backward), so no second [N, V] copy is held for the whole backward pass. Same
        # tokenizer, so its rows beyond the student's vocabulary are padding (Qwen2-VL-7B:
        # 152064 rows, 2B: 151936): drop them before the softmax.
        teacher_logits = teacher_logits.detach()[..., : student_logits.shape[-1]]

        if num_tokens == 0:
            # The empty sum is an exact 0 that still has a grad_fn (when the student requires
            # grad), so a micro-batch without answers does not break backward().
            zero = student_rows.to(dtype).sum()
            return KDLossOutput(loss=zero, kd_loss=zero.detach(), ce_loss=zero.detach(), num_tokens=0)

        # Recompute each chunk in backward instead of storing its fp32 temporaries; only
        # worth it (and only needed) when a graph is being recorded.
        recompute = torch.is_grad_enabled() and student_rows.requires_grad
        chunks = (
            (s, teacher_logits, (b, l), y, dtype)
            for s, b, l, y in zip(
                student_rows.split(self.chunk_size),
                *(index.split(self.chunk_size) for index in positions),
                targets.split(self.chunk_size),
            )
        )
        kd_sum, ce_sum = sum_over_chunks(self._chunk_sums, chunks, recompute)
        return self.output(kd_sum, ce_sum, denominator, num_tokens)

    def output(self, kd_sum: Tensor, ce_sum: Tensor, denominator: int, num_tokens: int) -> KDLossOutput:
        """alpha · T² · kd + (1 − alpha) · CE from the sums over answer tokens."""
        kd_loss = kd_sum / denominator
        ce_loss = ce_sum / denominator
        loss = self.alpha * self.temperature**2 * kd_loss + (1.0 - self.alpha) * ce_loss
        return KDLossOutput(loss=loss, kd_loss=kd_loss.detach(), ce_loss=ce_loss.detach(), num_tokens=num_tokens)

    @staticmethod
    def _answer_positions(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor):
        """Check the inputs; return the (batch, position) indices of the logits that predict an
        answer token (logits[:, :-1] predict labels[:, 1:]) and those tokens' ids [N]."""
        if student_logits.dim() != 3 or teacher_logits.dim() != 3 or labels.dim() != 2:
            raise ValueError(
                "expected student_logits [B, L, Vs], teacher_logits [B, L, Vt] and labels [B, L], got "
                f"{tuple(student_logits.shape)}, {tuple(teacher_logits.shape)} and {tuple(labels.shape)}"
            )
        if student_logits.shape[:2] != labels.shape or teacher_logits.shape[:2] != labels.shape:
            raise ValueError(
                "batch and sequence sizes differ: student_logits "
                f"{tuple(student_logits.shape)}, teacher_logits {tuple(teacher_logits.shape)}, "
                f"labels {tuple(labels.shape)}"
            )
        student_vocab, teacher_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
        if teacher_vocab < student_vocab:
            raise ValueError(
                f"teacher vocabulary ({teacher_vocab}) is smaller than the student's "
                f"({student_vocab}); the teacher must cover the student's vocabulary"
            )
        shifted = labels[:, 1:]
        positions = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
        targets = shifted[positions]
        if targets.numel() and ((targets < 0) | (targets >= student_vocab)).any():
            raise ValueError(
                f"labels must be {IGNORE_INDEX} or token ids in [0, {student_vocab}), got values in "
                f"[{int(targets.min())}, {int(targets.max())}]"
            )
        return positions, targets

    def _chunk_sums(self, student_rows: Tensor, teacher_logits: Tensor, positions, targets: Tensor, dtype):
        """Sums over one chunk of answer tokens of the divergence at T and of the CE at T = 1."""
        # Nested calls so the upcast copies and the scaled logits die as soon as used.
        student_logprobs = F.log_softmax(self._scaled(student_rows.to(dtype)), dim=-1)
        teacher_logprobs = F.log_softmax(self._scaled(teacher_logits[positions].to(dtype)), dim=-1)
        kd = self.divergence(teacher_logprobs, student_logprobs).sum()
        return kd, self.ce_sum(student_logprobs, student_rows, targets, dtype)

    def ce_sum(self, student_logprobs: Tensor, student_rows: Tensor, targets: Tensor, dtype) -> Tensor:
        """Σ of the ordinary cross-entropy (T = 1) over the chunk's answer tokens; at T = 1 the
        log-probabilities at T already are the ones it needs."""
        if self.temperature == 1.0:
            return F.nll_loss(student_logprobs, targets, reduction="sum")
        return F.cross_entropy(student_rows.to(dtype), targets, reduction="sum")

    def _scaled(self, logits: Tensor) -> Tensor:
        return logits if self.temperature == 1.0 else logits / self.temperature


class ForwardKL(KDLoss):
    """Forward KL, mean-seeking: ``KL(p||q) = sum_v p_v (log p_v - log q_v)``."""

    def divergence(self, teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
        return _kl(teacher_logprobs, student_logprobs)


class ReverseKL(KDLoss):
    """Reverse KL, mode-seeking: ``KL(q||p) = sum_v q_v (log q_v - log p_v)``."""

    def divergence(self, teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
        return _kl(student_logprobs, teacher_logprobs)


class JSD(KDLoss):
    """Generalized Jensen-Shannon divergence (Agarwal et al., 2024, "On-Policy Distillation
    of Language Models", GKD):

        JSD_beta(p||q) = beta * KL(p||m) + (1 - beta) * KL(q||m),   m = beta * p + (1 - beta) * q

    beta = 0.5 is the usual (symmetric) JSD. The divergence itself vanishes at both ends
    (at beta = 0, m = q: the first term has weight 0 and the second is KL(q||q) = 0; beta = 1
    likewise), but it interpolates between the two KLs once normalised:

        JSD_beta / beta       -> KL(p||q)  (forward KL)  as beta -> 0,
        JSD_beta / (1 - beta) -> KL(q||p)  (reverse KL)  as beta -> 1,

    since JSD_beta = beta * KL(p||q) - beta**2 / 2 * chi2(p||q) + O(beta**3) with
    chi2(p||q) = sum_v (p_v - q_v)**2 / q_v, and JSD_beta(p||q) = JSD_{1-beta}(q||p).
    So at beta = 0 or 1 this loss's kd term is exactly 0 (finite, zero gradient): use
    ForwardKL / ReverseKL for the endpoints' KLs, not JSD(beta=0/1).
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, beta: float = 0.5, chunk_size: int = 1024):
        super().__init__(temperature=temperature, alpha=alpha, chunk_size=chunk_size)
        _check_fraction("beta", beta)
        self.beta = float(beta)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"

    def divergence(self, teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
        beta = self.beta
        mixture_logprobs = _mixture(teacher_logprobs, student_logprobs, beta)
        return beta * _kl(teacher_logprobs, mixture_logprobs) + (1.0 - beta) * _kl(student_logprobs, mixture_logprobs)


class _Skewed(KDLoss):
    """Base of the skew KLs: `skew` (λ in [0, 1]) mixes the first distribution into the second."""

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, skew: float = 0.1, chunk_size: int = 1024):
        super().__init__(temperature=temperature, alpha=alpha, chunk_size=chunk_size)
        _check_fraction("skew", skew)
        self.skew = float(skew)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, skew={self.skew}"


class SkewForwardKL(_Skewed):
    """Skew forward KL (Ko et al., 2024, DistiLLM): ``KL(p || λ·p + (1−λ)·q)``.

    λ = 0 is the forward KL; a small λ keeps the divergence bounded where q has almost no mass."""

    def divergence(self, teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
        return _kl(teacher_logprobs, _mixture(teacher_logprobs, student_logprobs, self.skew))


class SkewReverseKL(_Skewed):
    """Skew reverse KL (DistiLLM): ``KL(q || λ·q + (1−λ)·p)``; λ = 0 is the reverse KL."""

    def divergence(self, teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
        return _kl(student_logprobs, _mixture(student_logprobs, teacher_logprobs, self.skew))


class NoKD(KDLoss):
    """No distillation, the control: the kd term is 0, so with alpha = 0 the loss is plain CE on
    the answer tokens. The teacher is not consulted (``uses_teacher``)."""

    uses_teacher = False

    def divergence(self, teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
        return student_logprobs.new_zeros(student_logprobs.shape[0])


# ----------------------------------------------------------------------------- hidden states

HIDDEN_LOSS_KINDS = ("mse", "cosine")


class HiddenStateLoss(torch.nn.Module):
    """Hidden-state distillation of one (student layer, teacher layer) pair through a learned
    projection ``W`` [d_t x d_s] (no bias) from the student's width to the teacher's (FitNets,
    Romero et al., 2015; TinyBERT, Jiao et al., 2020). With ``h_s`` [d_s] and ``h_t`` [d_t] the two
    models' hidden states at one position:

        mse:     ||W h_s - h_t||² / d_t      (the squared error averaged over the teacher's d_t features)
        cosine:  1 - cos(W h_s, h_t)

    summed over the answer positions and divided by ``num_answer_tokens`` exactly as
    :class:`KDLoss` divides its terms: the positions are those whose logits enter the kd loss,
    ``hidden[:, t]`` where ``labels[:, t + 1] != IGNORE_INDEX`` (the state at t predicts label t+1).
    So it is the mean over the answer tokens of the (accumulated) batch.

    The arithmetic runs in float32 (float64 when an input is float64), outside autocast. The
    teacher's states are a fixed target: no gradient flows into them. ``W`` is trained with the
    student but is not part of it (the saved student stays a stock model).
    """

    def __init__(self, student_width: int, teacher_width: int, kind: str = "mse"):
        super().__init__()
        if kind not in HIDDEN_LOSS_KINDS:
            raise ValueError(f"kind must be one of {list(HIDDEN_LOSS_KINDS)}, got {kind!r}")
        for name, width in (("student_width", student_width), ("teacher_width", teacher_width)):
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {width!r}")
        self.kind = kind
        self.projection = torch.nn.Linear(student_width, teacher_width, bias=False)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"

    def forward(
        self,
        student_hidden: Tensor,
        teacher_hidden: Tensor,
        labels: Tensor,
        num_answer_tokens: int | None = None,
    ) -> Tensor:
        """The loss of one (micro-)batch, a differentiable scalar.

        Args:
            student_hidden: [B, L, d_s], any float dtype.
            teacher_hidden: [B, L, d_t], any float dtype; detached.
            labels: [B, L], ``IGNORE_INDEX`` where no loss is wanted.
            num_answer_tokens: answer tokens of the whole accumulated batch (see
                :func:`count_answer_tokens`); ``None``: this micro-batch's own count.

        A micro-batch without answer tokens gives a 0 still connected to the graph.
        """
        d_s, d_t = self.projection.in_features, self.projection.out_features
        if student_hidden.dim() != 3 or teacher_hidden.dim() != 3 or labels.dim() != 2:
            raise ValueError(
                "expected student_hidden [B, L, d_s], teacher_hidden [B, L, d_t] and labels [B, L], got "
                f"{tuple(student_hidden.shape)}, {tuple(teacher_hidden.shape)} and {tuple(labels.shape)}"
            )
        if (
            student_hidden.shape[:2] != labels.shape
            or teacher_hidden.shape[:2] != labels.shape
            or student_hidden.shape[-1] != d_s
            or teacher_hidden.shape[-1] != d_t
        ):
            raise ValueError(
                f"shapes do not fit a projection from width {d_s} to {d_t}: student_hidden "
                f"{tuple(student_hidden.shape)}, teacher_hidden {tuple(teacher_hidden.shape)}, labels {tuple(labels.shape)}"
            )
        # The same positions as KDLoss: hidden[:, t] for each answer label[:, t + 1].
        positions = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        num_tokens = positions[0].numel()
        denominator = answer_token_denominator(num_tokens, num_answer_tokens)
        dtype = torch.promote_types(torch.promote_types(student_hidden.dtype, teacher_hidden.dtype), torch.float32)
        weight = self.projection.weight
        with torch.autocast(student_hidden.device.type, enabled=False):
            projected = F.linear(student_hidden[positions].to(dtype), weight.to(dtype))  # [N, d_t]
            target = teacher_hidden.detach()[positions].to(dtype)
            if self.kind == "mse":
                total = (projected - target).pow(2).sum() / d_t
            else:
                total = (1.0 - F.cosine_similarity(projected, target, dim=-1, eps=1e-8)).sum()
        # An empty sum is an exact 0 with a grad_fn: a micro-batch without answers still backprops.
        return total if num_tokens == 0 else total / denominator


def hidden_layer_pairs(layers, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Map student hidden-state indices to the teacher's, proportionally to depth.

    Indices are into transformers' ``outputs.hidden_states`` (``num_layers + 1`` entries:
    0 = the embeddings, i = the output of decoder layer i, the last = the final-norm output the
    LM head reads); negative ones count from the end as in Python (-1 = the last). Student index
    i in [0, L_s] pairs with teacher index ``floor(i * L_t / L_s + 1/2)``, so the embeddings pair
    with the embeddings and the last with the last.
    """
    pairs = []
    for index in layers:
        if (
            isinstance(index, bool)
            or not isinstance(index, int)
            or not -(student_layers + 1) <= index <= student_layers
        ):
            raise ValueError(
                f"hidden layer {index!r} is out of range: the student has {student_layers} layers, so give "
                f"indices in [{-(student_layers + 1)}, {student_layers}] (0: embeddings, -1: the last)"
            )
        i = index % (student_layers + 1)
        pairs.append((i, math.floor(i * teacher_layers / student_layers + 0.5)))
    if not pairs:
        raise ValueError("name at least one hidden layer, e.g. [-1] (the last)")
    return pairs


class HiddenDistillation(torch.nn.Module):
    """The hidden-state term over several layer pairs: the mean over the pairs of
    :class:`HiddenStateLoss` (one projection per pair), so its size does not grow with the number
    of pairs. ``layers`` are student indices, mapped by :func:`hidden_layer_pairs`."""

    def __init__(
        self,
        student_width: int,
        teacher_width: int,
        student_layers: int,
        teacher_layers: int,
        layers=(-1,),
        kind: str = "mse",
    ):
        super().__init__()
        self.pairs = hidden_layer_pairs(list(layers), student_layers, teacher_layers)
        self.losses = torch.nn.ModuleList(HiddenStateLoss(student_width, teacher_width, kind) for _ in self.pairs)

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}"

    def forward(
        self, student_hidden_states, teacher_hidden_states, labels: Tensor, num_answer_tokens: int | None = None
    ) -> Tensor:
        """``*_hidden_states``: the models' ``outputs.hidden_states`` tuples of [B, L, d]."""
        terms = [
            loss(student_hidden_states[s], teacher_hidden_states[t], labels, num_answer_tokens)
            for loss, (s, t) in zip(self.losses, self.pairs)
        ]
        return torch.stack(terms).mean() if len(terms) > 1 else terms[0]
