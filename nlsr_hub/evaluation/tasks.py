"""Fine-tune accuracy with the paper's rules: label-word match (SST-2, AG News), final number (GSM8K).

Examples are formatted with the Alpaca template the fine-tuning mixes use, so evaluation prompts match
what the model was trained on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .generation import generate_responses

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """An instruction (and input) in the Alpaca template; text already in the template is kept as is."""
    if "### Instruction:" in instruction:
        return instruction
    if input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction.strip(), input=input.strip())
    return ALPACA_NO_INPUT.format(instruction=instruction.strip())


def first_label(text: str, labels: Sequence[str]) -> str | None:
    """The label word that occurs first in `text` (case-insensitive, whole words), or None."""
    best: tuple[int, str] | None = None
    for label in labels:
        match = re.search(rf"(?<![A-Za-z]){re.escape(label)}(?![A-Za-z])", text, re.IGNORECASE)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), label)
    return best[1] if best else None


def final_number(text: str) -> str | None:
    """The final number of a GSM8K-style answer ('The final answer is: 18', '#### 18' or the last number)."""
    for marker in ("The final answer is", "####"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
            numbers = _NUMBER.findall(text)
            if numbers:
                return _normalise_number(numbers[0])
    numbers = _NUMBER.findall(text)
    return _normalise_number(numbers[-1]) if numbers else None


def _normalise_number(token: str) -> str:
    value = token.replace(",", "").rstrip(".")
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() else str(number)


@dataclass(frozen=True)
class TaskSpec:
    """A task: how to read its gold answer and whether a prediction matches it."""

    name: str
    max_new_tokens: int
    gold: Callable[[str], str | None]
    predict: Callable[[str], str | None]


def _label_task(name: str, labels: Sequence[str], max_new_tokens: int) -> TaskSpec:
    return TaskSpec(name, max_new_tokens, gold=lambda out: first_label(out, labels),
                    predict=lambda text: first_label(text, labels))


TASKS: dict[str, TaskSpec] = {
    "sst2": _label_task("sst2", ("positive", "negative"), 8),
    "ag_news": _label_task("ag_news", ("World", "Sports", "Business", "Sci/Tech"), 8),
    "gsm8k": TaskSpec("gsm8k", 200, gold=final_number, predict=final_number),
}


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    answer: str


@dataclass(frozen=True)
class TaskAccuracyResult:
    """Per-example predictions and correctness, and the accuracy in percent."""

    task: str
    examples: tuple[TaskExample, ...]
    predictions: tuple[str, ...]
    correct: tuple[bool, ...]

    @property
    def accuracy(self) -> float:
        return 100.0 * sum(self.correct) / len(self.correct) if self.correct else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "accuracy": self.accuracy, "n": len(self.correct),
                "items": [{"prompt": e.prompt, "answer": e.answer, "prediction": p, "correct": c}
                          for e, p, c in zip(self.examples, self.predictions, self.correct, strict=True)]}


def get_task(task: str) -> TaskSpec:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"Unknown `task` {task!r}; valid tasks: {', '.join(sorted(TASKS))}.") from None


def load_task_examples(task: str, source: str | Path | Sequence[dict[str, Any]] | Any, *,
                       limit: int | None = None) -> list[TaskExample]:
    """Examples from a JSON/JSONL file or rows with ``instruction`` (+ ``input``) and ``output`` (a `datasets`
    split with those columns works too); the first `limit` rows, as the paper takes the first 500."""
    spec = get_task(task)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Task data {path} does not exist.")
        text = path.read_text(encoding="utf-8")
        rows = [json.loads(x) for x in text.splitlines() if x.strip()] if path.suffix == ".jsonl" else json.loads(text)
    else:
        rows = list(source)
    examples = []
    for row in rows[:limit] if limit is not None else rows:
        gold = spec.gold(str(row["output"]))
        if gold is None:
            continue
        examples.append(TaskExample(alpaca_prompt(row["instruction"], row.get("input", "")), gold))
    if not examples:
        raise ValueError(f"No usable {task} example in the task data.")
    return examples


def task_accuracy(model: Any, tokenizer: Any, task: str, examples: Sequence[TaskExample], *,
                  max_new_tokens: int | None = None, batch_size: int = 8, progress: bool = True) -> TaskAccuracyResult:
    """Greedy predictions on `examples`, scored with the task's rule."""
    spec = get_task(task)
    predictions = generate_responses(model, tokenizer, [e.prompt for e in examples],
                                     max_new_tokens=max_new_tokens or spec.max_new_tokens, batch_size=batch_size,
                                     progress=progress, desc=f"nlsr: {task}")
    correct = [spec.predict(p) == e.answer for p, e in zip(predictions, examples, strict=True)]
    return TaskAccuracyResult(task, tuple(examples), tuple(predictions), tuple(correct))
