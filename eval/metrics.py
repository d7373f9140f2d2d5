"""Quality metrics: answer F1 and ROUGE-L against gold answers, and distribution-level fidelity
(KL divergence and top-1 agreement) against a full prefill of the same prompt."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch
from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
TEACHER_TOKENS = 16  # answer tokens of the full prefill that KL and top-1 are teacher-forced over


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, golds: Sequence[str]) -> float:
    """Token F1 of `prediction`, best over the gold answers."""
    return max((_f1(prediction, g) for g in golds), default=0.0)


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, golds: Sequence[str]) -> float:
    """ROUGE-L F-measure of `prediction`, best over the references."""
    return max((_SCORER.score(g, prediction)["rougeL"].fmeasure for g in golds), default=0.0)


def kl_per_position(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || candidate) per position for logits [P, vocab] -> [P] (nats)."""
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    cand = torch.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - cand)).sum(dim=-1)


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of positions where both distributions pick the same token."""
    return float((reference_logits.argmax(-1) == logits.argmax(-1)).float().mean())


def agree_prefix(reference_ids: Sequence[int], ids: Sequence[int]) -> float:
    """Share of the reference answer's tokens that `ids` repeats before the first difference (1.0 when
    both are empty)."""
    if not reference_ids:
        return float(not ids)
    turn = first_difference(reference_ids, ids)
    return (len(reference_ids) if turn is None else turn) / len(reference_ids)  # turn <= len(reference_ids)


def first_difference(reference_ids: Sequence[int], ids: Sequence[int]) -> int | None:
    """The first answer step where `ids` is not the reference's (one ending early counts there); None
    when they are the same answer."""
    if same_answer(reference_ids, ids):
        return None
    return next((i for i, (a, b) in enumerate(zip(reference_ids, ids)) if a != b), min(len(reference_ids), len(ids)))


def same_answer(reference_ids: Sequence[int], ids: Sequence[int]) -> bool:
    """Whether the greedy answer is token for token the reference's."""
    return list(reference_ids) == list(ids)
