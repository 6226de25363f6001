"""Calibration data: safe (prompt, response) pairs -> tokenised batches with response-token masks.

Pairs are rendered with the model's chat template (a user turn, then the assistant's response); only the
response tokens feed the statistics. Sources: a list of pairs (tuples, dicts or `CalibrationPair`), a JSON
or JSONL file, a `datasets` split, or None for the small built-in set of refusals shipped with nlsr-hub.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .io import read_text_file

_PROMPT_KEYS = ("prompt", "instruction", "question", "goal", "query")
_RESPONSE_KEYS = ("response", "chosen", "output", "answer", "completion")


@dataclass(frozen=True)
class CalibrationPair:
    """A harmful prompt and a safe response; `rejected` (an unsafe response) is used by `preference_snip`."""

    prompt: str
    response: str
    rejected: str | None = None


@dataclass(frozen=True)
class EncodedSample:
    """Token ids of one rendered pair and, per token, whether it belongs to the response."""

    input_ids: tuple[int, ...]
    response_mask: tuple[bool, ...]


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"Calibration texts must be strings, got {type(value).__name__}.")
    return value


def _pair_from_mapping(row: dict[str, Any]) -> CalibrationPair:
    prompt_key = next((k for k in _PROMPT_KEYS if k in row), None)
    response_key = next((k for k in _RESPONSE_KEYS if k in row), None)
    if prompt_key is None or response_key is None:
        raise ValueError(
            f"A calibration row needs a prompt field ({', '.join(_PROMPT_KEYS)}) and a response field "
            f"({', '.join(_RESPONSE_KEYS)}); got keys {sorted(row)}."
        )
    response, rejected = row[response_key], row.get("rejected")
    if isinstance(response, list):  # {"prompt", "response": [chosen, rejected]} preference format
        if len(response) != 2:
            raise ValueError("A list-valued `response` must be [chosen, rejected].")
        response, rejected = response
    rejected = None if rejected is None else _text(rejected)
    if prompt_key == "instruction" and row.get("input"):
        return CalibrationPair(f"{_text(row['instruction'])}\n\n{_text(row['input'])}", _text(response), rejected)
    return CalibrationPair(_text(row[prompt_key]), _text(response), rejected)


def _as_pair(item: Any) -> CalibrationPair:
    if isinstance(item, CalibrationPair):
        return item
    if isinstance(item, dict):
        return _pair_from_mapping(item)
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return CalibrationPair(*(_text(x) for x in item))
    raise TypeError(
        "Calibration items must be CalibrationPair, (prompt, response[, rejected]) tuples or dicts with "
        f"prompt/response fields; got {type(item).__name__}."
    )


def _read_file(path: Path) -> list[Any]:
    """The rows of a calibration file: a JSON array, an object with a ``data``/``rows`` array, a single pair
    object, or JSONL (one row per line). Anything else is a `ValueError` naming the file."""
    text = read_text_file(path, "Calibration file")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"Calibration file {path}, line {number}: not valid JSON ({err}).") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"Calibration file {path} is not valid JSON/JSONL ({err}).") from None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in ("data", "rows"):
            if isinstance(data.get(key), list):
                return data[key]
        if any(k in data for k in _PROMPT_KEYS) and any(k in data for k in _RESPONSE_KEYS):
            return [data]  # a file holding one pair
        raise ValueError(f"Calibration file {path} holds a JSON object with keys {sorted(data)[:8]}; write a list of "
                         "{prompt, response} objects, an object with a 'data' list, or JSONL (one pair per line).")
    raise ValueError(f"Calibration file {path} holds a JSON {type(data).__name__}, not calibration pairs; write a list "
                     "of {prompt, response} objects or JSONL (one pair per line).")


def default_calibration() -> list[CalibrationPair]:
    """The built-in calibration set: 32 harmful requests with safe refusals, written for nlsr-hub."""
    text = resources.files("nlsr_hub").joinpath("data/default_calibration.jsonl").read_text(encoding="utf-8")
    return [_pair_from_mapping(json.loads(line)) for line in text.splitlines() if line.strip()]


def load_calibration(source: Any = None, *, limit: int | None = None) -> list[CalibrationPair]:
    """Normalise any supported calibration source into a list of `CalibrationPair` (at most `limit`).

    Raises:
        ValueError: if the source holds no usable pair.
    """
    if source is None:
        pairs = default_calibration()
    elif isinstance(source, (str, Path)):
        path = Path(source)
        rows = _read_file(path)
        try:
            pairs = [_as_pair(row) for row in rows]
        except (TypeError, ValueError) as err:
            raise type(err)(f"Calibration file {path}: {err}") from None
    elif isinstance(source, Iterable):
        pairs = [_as_pair(row) for row in source]  # lists, tuples and `datasets.Dataset` rows alike
    else:
        raise TypeError(f"Unsupported calibration source of type {type(source).__name__}.")
    pairs = [p for p in pairs if p.prompt.strip() and p.response.strip()]
    if not pairs:
        raise ValueError(
            "The calibration data is empty: no (prompt, response) pair with non-empty texts. Pass safe "
            "responses to harmful prompts, e.g. [('How do I ...?', 'I can't help with that ...')]."
        )
    return pairs[:limit] if limit is not None else pairs


def fingerprint(pairs: Sequence[CalibrationPair]) -> str:
    """A SHA-256 over the pairs, recorded in plans and safety patches."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair.prompt, pair.response, pair.rejected]).encode("utf-8"))
    return digest.hexdigest()


def _render(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt turn and of the whole conversation."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": response}], tokenize=False
        )
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] == prompt_ids:
            return prompt_ids, full_ids
    else:
        prompt_ids = tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt_ids, prompt_ids + response_ids + eos


# texts are clipped to this many characters per kept token before tokenisation (a token rarely spans more), and the
# clip is trusted only when it still leaves this many tokens beyond the kept ones
_CHARS_PER_TOKEN = 32
_MARGIN_TOKENS = 64


def encode_pair(tokenizer: Any, prompt: str, response: str, max_length: int) -> EncodedSample:
    """Render and tokenise one pair, truncated to `max_length` tokens, with its response-token mask.

    Texts far longer than `max_length` tokens are clipped (in characters) before tokenisation, so a 2M-character
    prompt costs what a long one does; where the clipped text gives too few tokens to be sure the kept ones are
    unchanged, the pair is tokenised whole instead."""
    limit = _CHARS_PER_TOKEN * max_length + 1024
    short_prompt, short_response = prompt[:limit], response[:limit]
    prompt_ids, full_ids = _render(tokenizer, short_prompt, short_response)
    enough = max_length + _MARGIN_TOKENS
    if (len(short_prompt) < len(prompt) and len(prompt_ids) < enough) or (
            len(short_response) < len(response) and len(full_ids) < enough):
        prompt_ids, full_ids = _render(tokenizer, prompt, response)
    full_ids = full_ids[:max_length]
    mask = [i >= len(prompt_ids) for i in range(len(full_ids))]
    return EncodedSample(tuple(full_ids), tuple(mask))


def encode_pairs(tokenizer: Any, pairs: Sequence[CalibrationPair], max_length: int) -> list[EncodedSample]:
    """Encode every pair's (prompt, safe response); pairs left without a response token after truncation are
    dropped, and a `ValueError` is raised if none remains (preference pairs: `encode_preference_pairs`)."""
    samples = [sample for pair in pairs
               if any((sample := encode_pair(tokenizer, pair.prompt, pair.response, max_length)).response_mask)]
    if not samples:
        raise ValueError(
            f"No calibration pair has a response token within `max_length={max_length}`; raise `max_length` "
            "or shorten the prompts."
        )
    return samples


def encode_preference_pairs(
    tokenizer: Any, pairs: Sequence[CalibrationPair], max_length: int
) -> tuple[list[EncodedSample], list[EncodedSample]]:
    """Chosen and rejected sides of every pair, kept or dropped together: a pair is dropped when either side has
    no response token left after truncation, so the two lists stay aligned position by position."""
    chosen, rejected = [], []
    for pair in pairs:
        if pair.rejected is None:
            raise ValueError(
                "The `preference_snip` scorer needs a `rejected` response for every calibration pair "
                "(dicts with 'rejected', or (prompt, chosen, rejected) tuples)."
            )
        good = encode_pair(tokenizer, pair.prompt, pair.response, max_length)
        bad = encode_pair(tokenizer, pair.prompt, pair.rejected, max_length)
        if any(good.response_mask) and any(bad.response_mask):
            chosen.append(good)
            rejected.append(bad)
    if not chosen:
        raise ValueError(
            f"No calibration pair has a response token on both sides within `max_length={max_length}`; raise "
            "`max_length` or shorten the prompts."
        )
    return chosen, rejected


def iter_batches(samples: Sequence[EncodedSample], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches: ``input_ids``, ``attention_mask`` and ``response_mask`` (batch x seq)."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(s.input_ids) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        response = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, sample in enumerate(chunk):
            n = len(sample.input_ids)
            ids[row, :n] = torch.tensor(sample.input_ids)
            attention[row, :n] = 1
            response[row, :n] = torch.tensor(sample.response_mask)
        yield {"input_ids": ids, "attention_mask": attention, "response_mask": response}
