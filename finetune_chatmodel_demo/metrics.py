"""ROUGE-1/2/L and BLEU-4 on jieba-segmented text, as upstream ChatGLM3's finetune demo measures them.

计算方式 / How: both texts are cut into words with jieba; ROUGE F-scores come from `rouge_chinese` on the
words joined by spaces, BLEU-4 from nltk's `sentence_bleu` with smoothing method 3. Every score is ×100 and
rounded to 4 decimals per sample (as upstream), then averaged.
"""
import logging
from typing import Dict, Iterable, List

import jieba
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

# jieba logs "Building prefix dict..." on first use; keep it quiet so a script's last line stays its JSON.
jieba.setLogLevel(logging.WARNING)

METRIC_KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")

_rouge = Rouge()
_smoothing = SmoothingFunction().method3


def segment(text: str) -> List[str]:
    """jieba words of `text`, whitespace dropped (so spacing and line breaks do not count as words)."""
    return [word for word in jieba.cut(text.strip()) if word.strip()]


def score_pair(prediction: str, reference: str) -> Dict[str, float]:
    """ROUGE-1/2/L F and BLEU-4 of one prediction against one reference, each in [0, 100]."""
    pred_words = segment(prediction)
    ref_words = segment(reference)
    if not pred_words or not ref_words:
        # rouge_chinese raises on an empty side; two empty texts agree fully, one empty side scores nothing.
        value = 100.0 if not pred_words and not ref_words else 0.0
        return {key: value for key in METRIC_KEYS}
    rouge = _rouge.get_scores(" ".join(pred_words), " ".join(ref_words))[0]
    scores = {key: rouge[key]["f"] * 100 for key in ("rouge-1", "rouge-2", "rouge-l")}
    scores["bleu-4"] = float(sentence_bleu([ref_words], pred_words, smoothing_function=_smoothing)) * 100
    return {key: round(value, 4) for key, value in scores.items()}


def compute_metrics(predictions: Iterable[str], references: Iterable[str]) -> Dict[str, float]:
    """Average of `score_pair` over aligned predictions and references, plus `samples` (their count)."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(
            f"预测 {len(predictions)} 条与参考 {len(references)} 条数量不一致 / "
            f"{len(predictions)} predictions but {len(references)} references"
        )
    if not predictions:
        raise ValueError("没有可评测的样本 / Error: nothing to score (no predictions)")
    totals = {key: 0.0 for key in METRIC_KEYS}
    for prediction, reference in zip(predictions, references):
        for key, value in score_pair(prediction, reference).items():
            totals[key] += value
    summary = {key: round(total / len(predictions), 4) for key, total in totals.items()}
    summary["samples"] = len(predictions)
    return summary
