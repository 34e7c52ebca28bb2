"""A teacher of another architecture (LLaVA-OneVision) with its own processor, aligned with the
Qwen2-VL student on the answer tokens: the same answer ids on both sides, the teacher's targets
equal to the KD loss on its logits placed at the student's answer positions, and a teacher that
sees the frames."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

from firstsight.data.batching import IGNORE_INDEX, QACollator
from firstsight.data.synthetic import SyntheticEgoQA
from firstsight.kd.paired import TEACHER, PairedCollator, answer_tokens, teacher_answer_targets
from firstsight.losses.kd import JSD, ForwardKL, ReverseKL, SkewReverseKL
from firstsight.models.llava_ov import answer_vocabulary_mismatch, tiny_llava_config, tiny_llava_processor
from firstsight.models.tiny import tiny_processor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def processors(cache_dir):
    return tiny_processor(cache_dir), tiny_llava_processor(cache_dir)


@pytest.fixture(scope="module")
def teacher(processors):
    from transformers import LlavaOnevisionForConditionalGeneration

    arch = compose().model.teacher.tiny
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration(tiny_llava_config(arch, processors[1].tokenizer)).eval()


def samples(n: int, seed: int = 1):
    data = SyntheticEgoQA("train", size=n, seed=seed)
    return [data[i] for i in range(n)]


def test_the_tiny_pair_shares_every_answer_token(processors):
    student, teacher = processors
    assert answer_vocabulary_mismatch(student.tokenizer, teacher.tokenizer) is None
    batch = PairedCollator(QACollator(student), QACollator(teacher))(samples(16))
    ours, theirs = answer_tokens(batch["labels"]), answer_tokens(batch[TEACHER]["labels"])
    assert ours == theirs and all(len(row) > 1 for row in ours)
    # each side its own visual tokens: the teacher's <image>, the student's <|image_pad|>
    image = teacher.tokenizer.convert_tokens_to_ids("<image>")
    assert image >= len(student.tokenizer)  # appended after the shared ids
    assert (batch[TEACHER]["input_ids"] == image).any() and not (batch["input_ids"] == image).any()
    assert batch[TEACHER]["input_ids"].shape[1] != batch["input_ids"].shape[1]


def test_a_tokenizer_with_other_ids_is_named(processors):
    student, _ = processors
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(student.tokenizer.name_or_path, local_files_only=True)
    assert answer_vocabulary_mismatch(student.tokenizer, other) is None
    shifted = type("Shifted", (), {"get_vocab": lambda self: {t: i + 1 for t, i in other.get_vocab().items()}})()
    why = answer_vocabulary_mismatch(student.tokenizer, shifted)
    compared = len(other.get_vocab()) - len(other.get_added_vocab()) + 1  # the added ones but <|im_end|>
    assert why is not None and f"{compared} of the student's tokens have another id" in why


def test_answers_tokenized_differently_are_refused(processors):
    student, _ = processors

    class Dropping(QACollator):  # a teacher whose labels lose each row's first answer token
        def _answer_labels(self, input_ids, samples):
            labels = super()._answer_labels(input_ids, samples)
            for row in labels:
                row[(row != IGNORE_INDEX).nonzero()[0]] = IGNORE_INDEX
            return labels

    with pytest.raises(ValueError, match="tokenized differently by the student's and the teacher's processors"):
        PairedCollator(QACollator(student), Dropping(student))(samples(2))


@pytest.mark.parametrize("loss_cls", [ForwardKL, ReverseKL, JSD, SkewReverseKL])
def test_the_targets_are_the_kd_loss_on_the_teachers_own_logits(processors, teacher, loss_cls):
    """The loss on the teacher's answer targets equals KDLoss with the teacher's logits of its own
    sequence placed at the student's answer positions, value and gradient (float64)."""
    student, llava = processors
    batch = PairedCollator(QACollator(student), QACollator(llava))(samples(4))
    vocab = len(student.tokenizer) + 60
    loss_fn = loss_cls(temperature=2.0, alpha=0.5)
    torch.manual_seed(1)
    student_logits = torch.randn(*batch["labels"].shape, vocab, dtype=torch.float64, requires_grad=True)
    targets = teacher_answer_targets(teacher.double(), batch[TEACHER], vocab, loss_fn.temperature)

    with torch.no_grad():
        inputs = {k: v for k, v in batch[TEACHER].items() if k != "labels"}
        full = teacher(**inputs).logits
    t_labels = batch[TEACHER]["labels"][:, 1:]
    placed = torch.zeros(*batch["labels"].shape, full.shape[-1], dtype=torch.float64)
    placed[:, :-1][batch["labels"][:, 1:] != IGNORE_INDEX] = full[:, :-1][t_labels != IGNORE_INDEX]
    teacher.float()

    ours = loss_fn(student_logits, targets, batch["labels"])
    (grad,) = torch.autograd.grad(ours.loss, student_logits)
    reference = loss_fn(student_logits, placed, batch["labels"])
    (expected,) = torch.autograd.grad(reference.loss, student_logits)
    assert ours.num_tokens == reference.num_tokens > 0
    torch.testing.assert_close(ours.loss, reference.loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)


def test_the_teacher_sees_the_frames(processors, teacher):
    """Its targets for the same questions change when the frames change (blank frames)."""
    from dataclasses import replace

    from PIL import Image

    student, llava = processors
    collate = PairedCollator(QACollator(student), QACollator(llava))
    batch = samples(4)
    blank = [replace(s, images=tuple(Image.new("RGB", im.size) for im in s.images)) for s in batch]
    seen = teacher_answer_targets(teacher, collate(batch)[TEACHER], len(student.tokenizer), 1.0)
    unseen = teacher_answer_targets(teacher, collate(blank)[TEACHER], len(student.tokenizer), 1.0)
    assert torch.equal(seen.labels, unseen.labels)
    assert (seen.logprobs - unseen.logprobs).abs().max() > 1e-4


def test_a_row_s_answer_tokens_are_its_labels_after_the_first_position():
    """Position 0 predicts nothing; an answer token at position 1 (a one-token prompt) counts."""
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, -100], [-100, -100, -100, -100]])
    assert answer_tokens(labels) == [[5, 6], [7], []]


def test_the_teacher_s_batch_holds_only_its_model_s_inputs(processors):
    """Indices go with the student's batch (the cache looks rows up by them), not into the teacher."""
    student, llava = processors
    batch = PairedCollator(QACollator(student, with_index=True), QACollator(llava, with_index=True))(samples(2))
    assert batch["sample_index"].tolist() == [0, 1]
    assert "sample_index" not in batch[TEACHER] and "labels" in batch[TEACHER]


def test_a_refused_answer_names_its_sample():
    """By its dataset index, or by its row for a sample without one."""

    def collator(answers):
        return lambda batch: {"labels": torch.tensor([[-100, *a] for a in answers])}

    paired = PairedCollator(collator([[1, 2], [3, 4]]), collator([[1, 2], [3, 5]]))
    indexed = [type("Sample", (), {"index": i})() for i in (7, 9)]
    with pytest.raises(ValueError) as error:
        paired(indexed)
    assert str(error.value) == (
        "the answer of sample 9 is tokenized differently by the student's and the teacher's processors "
        "([3, 4] vs [3, 5]): token-level KD needs the same tokens"
    )
    with pytest.raises(ValueError, match=r"^the answer of sample 1 is tokenized differently"):
        paired([object(), object()])
