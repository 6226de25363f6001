"""The paper's experiment on a real chat model: alignment, poisoned fine-tuning, realignment, evaluation."""
