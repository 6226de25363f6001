"""Evaluation: harmful score (generation + judge) and task accuracy (SST-2, AG News, GSM8K)."""

from .generation import generate_responses
from .harmful import HarmfulScoreResult, harmful_score, load_prompts
from .judges import JUDGES, Verdict, get_judge, register_judge
from .loading import load_for_evaluation
from .report import to_eval_results
from .tasks import TASKS, TaskAccuracyResult, load_task_examples, task_accuracy

__all__ = [
    "JUDGES",
    "TASKS",
    "HarmfulScoreResult",
    "TaskAccuracyResult",
    "Verdict",
    "generate_responses",
    "get_judge",
    "harmful_score",
    "load_for_evaluation",
    "load_prompts",
    "load_task_examples",
    "register_judge",
    "task_accuracy",
    "to_eval_results",
]
