"""Evaluation: safety figures (generation + judges, each beside over-refusal), judge agreement, task accuracy."""

from . import guards  # noqa: F401  (registers the Hub guard judges)
from .agreement import PairAgreement, pair_agreement, pairwise_agreement
from .generation import generate_responses
from .harmful import HarmfulScoreResult, harmful_score, load_prompts, score_responses
from .judges import JUDGES, Judge, JudgeInfo, Verdict, get_judge, judge_help, register_judge
from .loading import load_for_evaluation
from .report import to_eval_results
from .tasks import TASKS, TaskAccuracyResult, load_task_examples, task_accuracy

__all__ = [
    "JUDGES",
    "TASKS",
    "HarmfulScoreResult",
    "Judge",
    "JudgeInfo",
    "PairAgreement",
    "TaskAccuracyResult",
    "Verdict",
    "generate_responses",
    "get_judge",
    "harmful_score",
    "judge_help",
    "load_for_evaluation",
    "load_prompts",
    "load_task_examples",
    "pair_agreement",
    "pairwise_agreement",
    "register_judge",
    "score_responses",
    "task_accuracy",
    "to_eval_results",
]
