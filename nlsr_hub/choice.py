"""Choose a restorer by measurement, for the adapter at hand.

No restorer wins on every aligned adapter: adding the aligned update back (``nlsr-addback``, the default) restores
most of an SFT safety adapter's refusals, but raises the non-refusal rate of a DPO-aligned pair, whose update also
teaches answering (results/restorers/). So the choice is measured: every candidate configuration realigns the
fine-tuned adapter, each realigned model answers probe prompts (harmful requests; the share it does not refuse, by
the keyword refusal judge, which measures non-refusal, not harm) and, when rows of the user's own task are given,
scores them (mean negative log-likelihood per response token: the utility proxy). The candidate with the lowest
non-refusal rate among those whose NLL rose by at most `tolerance` over the fine-tuned adapter's wins.

`measure` runs the model; `pick` is the pure decision; `NLSRPatcher.choose` composes them with the restorers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from .adapters import LoraAdapter
from .calibration import CalibrationPair, EncodedSample, encode_pairs, iter_batches

if TYPE_CHECKING:
    from .config import NLSRConfig

# Candidates tried by default, in order of preference (a tie goes to the earlier one): the project's default
# (add-back of the reference's safety-critical rows), the paper's NLSR, and halfway interpolation to the aligned
# adapter. Each is a set of `NLSRConfig` changes over the patcher's config.
CANDIDATES: Mapping[str, Mapping[str, Any]] = {
    "default": {"preset": "default"},
    "paper": {"preset": "paper"},
    "interpolate 0.5": {"restorer": "interpolate", "strength": 0.5},
}
# the patcher's settings every candidate keeps: the reference (beta) and the calibration pass's sizes and seed
RUN_FIELDS = ("beta", "seed", "max_calibration_samples", "batch_size", "max_length")
DEFAULT_TOLERANCE = 0.05  # nats per response token of the user's task rows
DEFAULT_PROBES = 64  # probe prompts drawn from the calibration data when none are given
PROBE_TOKENS = 32
UTILITY_MAX_LENGTH = 512  # tokens of a task row (prompt and response) kept for its NLL
NO_PROBES = "No probe prompts: pass harmful prompts (or calibration data) to measure non-refusal on."
NO_CANDIDATES = "No candidate to choose from; pass at least one restorer configuration."


@dataclass(frozen=True)
class Measurement:
    """One model's probe figures: the share of probe prompts not refused (%), the mean NLL per response token on the
    utility rows (None when none were given), how many of each, and the seconds taken (logged, never written: the
    same inputs give the same plan bytes)."""

    non_refusal: float
    utility_nll: float | None
    probes: int
    utility_rows: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The figures as the plan records them (without `seconds`)."""
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items() if k != "seconds"}


@dataclass(frozen=True)
class Choice:
    """What `NLSRPatcher.choose` measured and decided: the fine-tuned adapter's figures, every candidate's (label,
    config changes, figures), the chosen label and why."""

    finetuned: Measurement
    candidates: tuple[tuple[str, Mapping[str, Any], Measurement], ...]
    chosen: str
    tolerance: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "reason": self.reason, "tolerance": self.tolerance,
                "judge": "keyword refusal judge (non-refusal, not harm)",
                "finetuned": self.finetuned.to_dict(),
                "candidates": [{"label": label, "changes": dict(changes), **m.to_dict()}
                               for label, changes, m in self.candidates]}


def choice_table(record: Mapping[str, Any]) -> str:
    """A plain-text table of a choice record (`Choice.to_dict`, a plan's ``choice``), the chosen candidate marked."""
    rows = [("fine-tuned", record["finetuned"])] + [(c["label"], c) for c in record["candidates"]]
    lines = [f"{'model':<22} {'non-refusal %':>13} {'task NLL':>9}"]
    for label, m in rows:
        nll = f"{m['utility_nll']:.4f}" if m.get("utility_nll") is not None else "-"
        mark = "<- chosen" if label == record["chosen"] and m is not record["finetuned"] else ""
        lines.append(f"{label:<22} {m['non_refusal']:>13.1f} {nll:>9} {mark}".rstrip())
    lines.append(f"chosen: {record['chosen']} ({record['reason']}); non-refusal by the keyword judge on "
                 f"{record['finetuned']['probes']} probe prompts")
    return "\n".join(lines)


def candidate_config(base: NLSRConfig, changes: Mapping[str, Any]) -> NLSRConfig:
    """The candidate's config: ``changes["preset"]``'s settings (or the field defaults), `base`'s `RUN_FIELDS`, then
    the other `changes`."""
    from .config import PRESETS, NLSRConfig

    changes = dict(changes)
    preset = changes.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r} in a candidate; valid presets: {', '.join(sorted(PRESETS))}.")
    run = {name: getattr(base, name) for name in RUN_FIELDS}
    return NLSRConfig(**{**(PRESETS[preset] if preset else {}), **run, **changes})


def candidate_configs(base: NLSRConfig, candidates: Mapping[str, Mapping[str, Any]] | None = None
                      ) -> dict[str, tuple[dict[str, Any], NLSRConfig]]:
    """Label -> (changes, config) of every candidate (default `CANDIDATES`), each config built and checked now."""
    candidates = CANDIDATES if candidates is None else candidates
    if not candidates:
        raise ValueError(NO_CANDIDATES)
    return {label: (dict(changes), candidate_config(base, changes)) for label, changes in candidates.items()}


def check_tolerance(tolerance: float | None) -> float:
    """`tolerance` (None: `DEFAULT_TOLERANCE`), or a `ValueError` unless it is a finite number >= 0."""
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"`tolerance` must be a finite number >= 0 (got {tolerance}).")
    return float(tolerance)


def probe_prompts(probes: Sequence[str] | None, calibration: Any, *, limit: int | None = None) -> list[str]:
    """The probe prompts: `probes`, else the first `DEFAULT_PROBES` prompts of the calibration data."""
    from .calibration import load_calibration

    prompts = list(probes) if probes is not None else [
        pair.prompt for pair in load_calibration(calibration, limit=limit)][:DEFAULT_PROBES]
    if not prompts:
        raise ValueError(NO_PROBES)
    return prompts


def pick(finetuned: Measurement, candidates: Sequence[Measurement], tolerance: float = DEFAULT_TOLERANCE
         ) -> tuple[int, str]:
    """The index of the chosen candidate and the reason, in words.

    Eligible candidates keep the utility NLL within `tolerance` of the fine-tuned adapter's (every candidate is
    eligible when no utility rows were measured); the eligible one with the lowest non-refusal rate wins, a tie going
    to the earlier candidate. When none is eligible, the one whose NLL rose least wins."""
    if not candidates:
        raise ValueError(NO_CANDIDATES)
    tolerance = check_tolerance(tolerance)

    def rise(m: Measurement) -> float:
        if m.utility_nll is None or finetuned.utility_nll is None:
            return 0.0
        return m.utility_nll - finetuned.utility_nll

    eligible = [i for i, m in enumerate(candidates) if rise(m) <= tolerance]
    if not eligible:
        best = min(range(len(candidates)), key=lambda i: (rise(candidates[i]), i))
        return best, (f"no candidate kept the task NLL within {tolerance:g} of the fine-tuned adapter's; the one "
                      f"whose NLL rose least (+{rise(candidates[best]):.3f})")
    best = min(eligible, key=lambda i: (candidates[i].non_refusal, i))
    within = "" if finetuned.utility_nll is None else f" among {len(eligible)} within the task-NLL tolerance"
    return best, f"lowest non-refusal rate on the probe prompts{within}"


def encode_utility(tokenizer: Any, rows: Sequence[CalibrationPair], max_length: int = UTILITY_MAX_LENGTH
                   ) -> list[EncodedSample]:
    """The task rows tokenised once for every candidate's NLL (rows with no response token within `max_length`
    dropped); a `ValueError` naming the task rows when none is left."""
    try:
        return encode_pairs(tokenizer, rows, max_length)
    except ValueError:  # its message speaks of calibration pairs
        raise ValueError(f"Utility rows: no task row has a response token within {max_length} tokens; shorten the "
                         "prompts of the task rows.") from None


def response_nll(model: Any, samples: Sequence[EncodedSample], *, pad_id: int, batch_size: int = 8) -> float:
    """Mean negative log-likelihood per response token of the encoded rows (`encode_utility`) under `model`."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in iter_batches(samples, batch_size, pad_id):
            ids = batch["input_ids"].to(device)
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
            mask = batch["response_mask"][:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            total += float(nll[mask].sum())
            tokens += int(mask.sum())
    return total / tokens


def measure(model: Any, tokenizer: Any, adapter: LoraAdapter, probes: Sequence[str],
            utility: Sequence[EncodedSample] | None = None, *, max_new_tokens: int = PROBE_TOKENS,
            batch_size: int = 16, progress: bool = False, desc: str = "nlsr: probe") -> Measurement:
    """Attach `adapter` to `model` and measure it: the non-refusal rate on `probes` (greedy, `max_new_tokens`) and,
    when encoded `utility` rows are given (`encode_utility`), their mean response NLL. The model is left as it was."""
    from .evaluation import generate_responses
    from .evaluation.judges import is_refusal
    from .modeling import attached_adapter

    if not probes:
        raise ValueError(NO_PROBES)
    started = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with attached_adapter(model, adapter) as peft_model:
        responses = generate_responses(peft_model, tokenizer, list(probes), max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, progress=progress, desc=desc)
        nll = response_nll(peft_model, utility, pad_id=pad_id, batch_size=batch_size) if utility else None
    answered = sum(not is_refusal(r) for r in responses)
    return Measurement(non_refusal=100.0 * answered / len(responses), utility_nll=nll, probes=len(responses),
                       utility_rows=len(utility or ()), seconds=round(time.perf_counter() - started, 1))


__all__ = ["CANDIDATES", "DEFAULT_PROBES", "DEFAULT_TOLERANCE", "RUN_FIELDS", "Choice", "Measurement",
           "candidate_config", "candidate_configs", "check_tolerance", "choice_table", "encode_utility", "measure",
           "pick", "probe_prompts", "response_nll"]
