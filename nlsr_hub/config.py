"""`NLSRConfig`: every knob of a realignment, with its default and help.

This dataclass is the single source of truth for the CLI flags and the Space inputs: both are generated
from its fields (``metadata["help"]``, ``metadata["choices"]``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

SELECTIONS = ("adaptive", "threshold", "fraction", "blocks")
RESTORATIONS = ("neuron", "swap", "module")
GRANULARITIES = ("element", "row")
# "auto" follows `compat`: the published code's choice with compat=True, the paper's otherwise
MASK_RULE_CHOICES = ("auto", "top_k", "strict_threshold")
DRAW_ORDERS = ("auto", "sorted_names", "layer_major")
SWAP_SCALINGS = ("auto", "rescaled", "unscaled")


def _field(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


def parse_block_ranges(spec: str) -> tuple[int, ...]:
    """Parse ``"0-3,8,10-11"`` into sorted block indices ``(0, 1, 2, 3, 8, 10, 11)``."""
    blocks: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            start, stop = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"`blocks` must look like '0-3,8'; could not read {part!r}.") from None
        if start < 0 or stop < start:
            raise ValueError(f"`blocks` range {part!r} is empty or negative; write 'start-stop' with start <= stop.")
        blocks.update(range(start, stop + 1))
    if not blocks:
        raise ValueError("`blocks` names no block; write e.g. '0-3,8'.")
    return tuple(sorted(blocks))


@dataclass(frozen=True)
class NLSRConfig:
    """Configuration of one realignment. The field defaults are NLSR with the paper's settings (SPEC.md); the
    project's measured default, which `NLSRPatcher`, ``nlsr realign``, the Space and the demo use when no config
    is given, is ``NLSRConfig.preset("default")``, and ``NLSRConfig.preset("paper")`` is the paper's NLSR.

    `restorer` picks the training-free restorer (`nlsr_hub.restorers.RESTORERS`); the other fields are the knobs
    of the restorers that use them (each restorer's docstring names its own)."""

    restorer: str = _field("nlsr", "Training-free restorer (see `nlsr_hub.restorers.RESTORERS`).")
    beta: float = _field(0.9, "EXPO extrapolation strength: reference = (1+beta)*aligned - beta*weak. 0 = aligned.")
    scorer: str = _field("low_rank", "Safety-critical neuron scorer (see `nlsr_hub.scoring.SCORERS`).")
    sparsity_ratio: float = _field(
        0.8, "P_SR: share of each factor that is NOT safety-critical; the top (1 - P_SR) entries are kept."
    )
    granularity: str = _field(
        "element", "Mask granularity: 'element' (entries of A and B, the paper) or 'row' (output neurons).",
        GRANULARITIES,
    )
    selection: str = _field("adaptive", "How modules to patch are chosen.", SELECTIONS)
    prune_ratio: float = _field(0.5, "P_L of adaptive selection: expected share of modules left unpatched.")
    epsilon: float = _field(0.2, "Epsilon of adaptive selection: keep probabilities span P_L +/- epsilon.")
    threshold: float = _field(0.8, "Tau of threshold selection: patch modules whose similarity is below it.")
    fraction: float = _field(0.2, "Share of modules patched by fraction selection (the least similar ones).")
    blocks: str | None = _field(None, "Block ranges patched by 'blocks' selection, e.g. '0-3,8'.")
    restoration: str = _field(
        "neuron", "How patched modules are restored: 'neuron' (exact Eq. 11), 'swap' (factor-wise), "
        "'module' (whole module replaced by the reference).", RESTORATIONS,
    )
    compat: bool = _field(
        False, "Reproduce the published code where it differs from the paper (SPEC.md): EXPO on both factors, "
        "int(r*P_SR) kept directions, patch when gamma = 1, factor swap, and, through the 'auto' fields, the "
        "block-by-block scorer (scorer 'low_rank' runs as 'low_rank_sequential'), mask_rule 'strict_threshold', "
        "draw_order 'layer_major' and swap_scaling 'unscaled'.",
    )
    mask_rule: str = _field(
        "auto", "How each factor's safety-critical entries are counted: 'top_k' (the round((1-P_SR)*N) largest "
        "scores, ties broken by position; the paper), 'strict_threshold' (scores strictly above the one at ascending "
        "position int(N*P_SR), compared in the factor's dtype, every tie with it dropped; the published code), "
        "'auto' (strict_threshold with compat, top_k otherwise).", MASK_RULE_CHOICES,
    )
    draw_order: str = _field(
        "auto", "Random draws of adaptive selection: 'sorted_names' (one CPU uniform stream seeded with `seed`, "
        "modules in sorted-name order, draw = u < P_j), 'layer_major' (the published code: a generator seeded with "
        "`seed`, one torch.bernoulli(P_j) per module, block by block in q,k,v,o,gate,up,down order; drawn on CPU, "
        "while the published runs drew on a GPU, whose stream differs), 'auto' (layer_major with compat, "
        "sorted_names otherwise).", DRAW_ORDERS,
    )
    swap_scaling: str = _field(
        "auto", "Factor swap between modules with unequal LoRA scales: 'rescaled' (B_e times s_e/s_t, so the swapped "
        "entries carry the reference's update), 'unscaled' (B_e copied as is; the published code), 'auto' "
        "(unscaled with compat, rescaled otherwise). Equal scales give the same result.", SWAP_SCALINGS,
    )
    seed: int = _field(42, "Seed of every random draw (adaptive selection, random scorer).")
    max_calibration_samples: int = _field(256, "Most calibration pairs used for scoring.")
    batch_size: int = _field(8, "Calibration batch size.")
    max_length: int = _field(512, "Calibration sequences are truncated to this many tokens.")
    strength: float = _field(
        1.0, "Lambda of 'addback' (dW_t + lambda*dW_a), 'interpolate' (dW_t + lambda*(dW_a - dW_t)) and "
        "'nlsr-addback' (dW_t + lambda*M*dW_ref).",
    )
    kept_energy: float = _field(
        0.99, "Element-granularity dense restorers: share of the correction's squared singular values kept when it "
        "is re-factorised into LoRA factors (its error is recorded per module in the plan).",
    )

    def __post_init__(self) -> None:
        from .restorers import RESTORERS  # local imports: neither imports this module at module level
        from .scoring import SCORERS

        self._check_types()
        RESTORERS.lookup(self.restorer)
        for name in ("beta", "strength", "kept_energy", "threshold", "sparsity_ratio", "prune_ratio", "epsilon",
                     "fraction"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"`{name}` must be a finite number (got {getattr(self, name)}).")
        SCORERS.lookup(self.scorer)
        for name, choices in (
            ("granularity", GRANULARITIES), ("selection", SELECTIONS), ("restoration", RESTORATIONS),
            ("mask_rule", MASK_RULE_CHOICES), ("draw_order", DRAW_ORDERS), ("swap_scaling", SWAP_SCALINGS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"Unknown `{name}` {value!r}; valid values: {', '.join(choices)}.")
        if self.beta < 0:
            raise ValueError(f"`beta` must be >= 0 (got {self.beta}); 0 uses the aligned adapter itself.")
        for name in ("sparsity_ratio", "prune_ratio", "fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must lie in [0, 1] (got {value}).")
        if self.sparsity_ratio >= 1.0:
            raise ValueError("`sparsity_ratio` must be < 1, otherwise no neuron is safety-critical.")
        if not 0.0 <= self.epsilon <= min(self.prune_ratio, 1.0 - self.prune_ratio):
            raise ValueError(
                f"`epsilon` must lie in [0, min(prune_ratio, 1 - prune_ratio)] so probabilities stay in [0, 1] "
                f"(got epsilon={self.epsilon}, prune_ratio={self.prune_ratio})."
            )
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"`threshold` is a cosine similarity and must lie in [-1, 1] (got {self.threshold}).")
        if self.selection == "blocks":
            if not self.blocks:
                raise ValueError("`selection='blocks'` needs `blocks`, e.g. blocks='0-3,8'.")
            parse_block_ranges(self.blocks)
        for name in ("max_calibration_samples", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer (got {getattr(self, name)}).")
        if self.strength < 0:
            raise ValueError(f"`strength` must be >= 0 (got {self.strength}); 0 leaves the fine-tuned adapter as is.")
        if not 0.0 < self.kept_energy <= 1.0:
            raise ValueError(f"`kept_energy` must lie in (0, 1] (got {self.kept_energy}).")
        if self.compat and self.restoration == "module":
            raise ValueError("`compat=True` restores factor-wise ('swap'); it cannot be combined with 'module'.")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"`seed` must lie in [0, 2**63) (got {self.seed}).")

    def _check_types(self) -> None:
        """A `TypeError` naming the field whose value has the wrong type: `compat: 'false'` in a YAML file must not
        turn compat on, nor `beta: true` mean 1.0 (bools are not numbers here, and ints are accepted as floats)."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            kinds, optional = _FIELD_KINDS[item.name]
            if value is None and optional:
                continue
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                label = {bool: "true or false", int: "an integer", str: "a string"}.get(kinds[0], "a number")
                raise TypeError(f"`{item.name}` must be {label}{' or null' if optional else ''} (got {value!r} of "
                                f"type {type(value).__name__}); in a YAML/JSON config write e.g. "
                                f"`{item.name}: {json.dumps(item.default)}`.")

    @classmethod
    def preset(cls, name: str, **changes: Any) -> NLSRConfig:
        """A named configuration (`PRESETS`): ``default`` (the project's measured default) or ``paper`` (NLSR with
        the paper's settings), with `changes` on top."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}.")
        return cls(**{**PRESETS[name], **changes})

    @property
    def effective_restoration(self) -> str:
        """The restoration actually used: the published code always swaps factors."""
        return "swap" if self.compat else self.restoration

    @property
    def effective_scorer(self) -> str:
        """The scorer actually run: with `compat`, ``low_rank`` is the published block-by-block variant
        (``low_rank_sequential``); every other scorer runs as named."""
        return "low_rank_sequential" if self.compat and self.scorer == "low_rank" else self.scorer

    @property
    def effective_mask_rule(self) -> str:
        """`mask_rule`, with ``auto`` resolved through `compat` (see `nlsr_hub.masks.MASK_RULES`)."""
        return _resolve_auto(self.mask_rule, self.compat, published="strict_threshold", paper="top_k")

    @property
    def effective_draw_order(self) -> str:
        """`draw_order`, with ``auto`` resolved through `compat` (see `nlsr_hub.selection.DRAWS`)."""
        return _resolve_auto(self.draw_order, self.compat, published="layer_major", paper="sorted_names")

    @property
    def effective_swap_scaling(self) -> str:
        """`swap_scaling`, with ``auto`` resolved through `compat`."""
        return _resolve_auto(self.swap_scaling, self.compat, published="unscaled", paper="rescaled")

    def replace(self, **changes: Any) -> NLSRConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def cache_key(self) -> dict[str, Any]:
        """The config as it names a computation in a cache: `to_dict` without the fields added after cached results
        existed (`LATER_FIELDS`) while they hold their default, which reproduces what ran before they existed. A
        result cached before a field was added is therefore found again; any other value of it makes a new key."""
        data = self.to_dict()
        for name in LATER_FIELDS:
            if data[name] == _DEFAULTS[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NLSRConfig:
        """A config from ``{field: value}``; unknown fields, wrong types and out-of-range values are refused."""
        if not isinstance(data, dict):
            raise TypeError(f"An NLSRConfig is a mapping of field names to values (got {type(data).__name__}); write "
                            "e.g. `{\"beta\": 0.9}` in JSON or `beta: 0.9` in YAML.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ValueError(f"Unknown NLSRConfig field(s) {unknown}; valid fields: {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> NLSRConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"The config is not valid JSON ({err}).") from None
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_yaml(cls, text: str) -> NLSRConfig:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"The config is not valid YAML ({' '.join(str(err).split())}).") from None
        return cls.from_dict({} if data is None else data)


def _resolve_auto(value: str, compat: bool, *, published: str, paper: str) -> str:
    """`value` itself, or for ``auto`` the published code's choice under `compat` and the paper's otherwise."""
    if value != "auto":
        return value
    return published if compat else paper


def _field_kinds() -> dict[str, tuple[tuple[type, ...], bool]]:
    """Each field's accepted Python types (a float field also takes ints) and whether None is allowed, from the
    annotations."""
    kinds = {}
    for name, hint in typing.get_type_hints(NLSRConfig).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args else hint
        kinds[name] = ((float, int) if base is float else (base,), bool(args))
    return kinds


_FIELD_KINDS = _field_kinds()


# Named configurations (changes to the field defaults): the paper's NLSR settings stay one preset away whatever
# the default becomes. "default" is the head-to-head's winner (results/restorers/results.md).
PRESETS: dict[str, dict[str, Any]] = {
    # the reference's safety-critical output rows (top 20 % by activation-weighted |ΔW_e|) added back once, in every
    # module: on the demo's SFT pair it cut the mean non-refusal rate by 63 % and kept SST-2 accuracy
    "default": {"restorer": "nlsr-addback", "granularity": "row", "selection": "fraction", "fraction": 1.0,
                "strength": 1.0},
    "paper": {"restorer": "nlsr", "beta": 0.9, "scorer": "low_rank", "sparsity_ratio": 0.8, "granularity": "element",
              "selection": "adaptive", "prune_ratio": 0.5, "epsilon": 0.2, "restoration": "neuron"},
}

#: Fields added after results were cached under `NLSRConfig.cache_key`; each one's default reproduces what ran
#: before it existed (issue #21: the `auto` rules resolve to the paper's, the old behaviour, unless `compat`).
LATER_FIELDS: tuple[str, ...] = ("mask_rule", "draw_order", "swap_scaling")
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(NLSRConfig)}
