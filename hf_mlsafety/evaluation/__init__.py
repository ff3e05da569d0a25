"""Per-language safety evaluation: judges, the evaluator, the report, a training callback and an `evaluate` metric."""

import os

from .callback import SafetyEvalCallback
from .evaluator import SafetyEvaluator, load_model_and_tokenizer
from .judges import INVALID, REFUSAL_MARKERS, SAFE, UNSAFE, GuardModelJudge, RefusalJudge, is_degenerate, is_echo, is_refusal, parse_guard_verdict
from .report import SafetyReport, plot_asr_comparison


# Folder of the `evaluate` metric module: `evaluate.load(ASR_METRIC_PATH)` works offline.
ASR_METRIC_PATH = os.path.join(os.path.dirname(__file__), "asr_metric")

__all__ = [
    "ASR_METRIC_PATH",
    "INVALID",
    "REFUSAL_MARKERS",
    "SAFE",
    "UNSAFE",
    "GuardModelJudge",
    "RefusalJudge",
    "SafetyEvalCallback",
    "SafetyEvaluator",
    "SafetyReport",
    "is_degenerate",
    "is_echo",
    "is_refusal",
    "load_model_and_tokenizer",
    "parse_guard_verdict",
    "plot_asr_comparison",
]
