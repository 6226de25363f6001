"""`NLSRPatcher`: orchestration only — resolve inputs, build the reference and safety patch, plan, execute."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .adapters import AdapterError, LoraAdapter, check_finite, check_peft_config, load_adapter
from .calibration import fingerprint, load_calibration
from .config import NLSRConfig
from .hub import MODEL_PATTERNS, PATCH_FILES, ResolvedInput, resolve
from .modeling import check_device, load_base_model, resolve_dtype
from .offload import load_offloaded, parse_max_memory, use_offload
from .patch import check_compatible_modules
from .plan import RealignmentPlan
from .reference import build_reference
from .restorers import RestoreInputs, get_restorer, restore
from .result import RealignmentResult
from .safety_patch import SafetyPatch, build_safety_patch
from .scoring import get_scorer
from .statistics import check_finite_statistics, collect_statistics
from .variants import check_unquantised_checkpoint

logger = logging.getLogger(__name__)


def _base_name(name: str | None) -> str | None:
    return name.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1].lower() if name else None


def check_same_base(adapters: Mapping[str, LoraAdapter]) -> None:
    """Raise `AdapterError` if the adapters' recorded base models differ (compared by model name, so a
    local copy and its Hub id agree)."""
    named = {role: a.base_model_name_or_path for role, a in adapters.items() if a.base_model_name_or_path}
    if len({_base_name(n) for n in named.values()}) > 1:
        listing = ", ".join(f"{role}: {name}" for role, name in sorted(named.items()))
        raise AdapterError(
            f"The adapters were trained on different base models ({listing}). NLSR compares adapters of one "
            "base model; pass adapters of the same base, or `strict_base=False` if these names are the same model."
        )


def _utility_rows(source: Any) -> list[Any] | None:
    """The user's task rows for the utility check (any calibration source), or None."""
    if source is None:
        return None
    try:
        return load_calibration(source)
    except (TypeError, ValueError) as err:
        raise type(err)(f"Utility rows: {str(err).replace('calibration data', 'task data')}") from None


def _check_inputs(**inputs: Any) -> None:
    """A `TypeError` for an input of the wrong kind, an `AdapterError` naming the role and module for NaN/inf."""
    for role, value in inputs.items():
        kind = SafetyPatch if role == "safety_patch" else LoraAdapter
        if value is None:
            continue
        if not isinstance(value, kind):
            raise TypeError(f"`{role}` must be a {kind.__name__} (got {type(value).__name__}); use "
                            "`NLSRPatcher.from_pretrained` to pass folders or Hub ids.")
        if isinstance(value, LoraAdapter):
            check_finite(value, f"The {role} adapter")


class NLSRPatcher:
    """Realign fine-tuned LoRA adapters with a safety reference (see `from_pretrained`)."""

    def __init__(
        self,
        *,
        finetuned: LoraAdapter | None = None,
        base: str | Path | Any | None = None,
        aligned: LoraAdapter | None = None,
        reference: LoraAdapter | None = None,
        weak: LoraAdapter | None = None,
        safety_patch: SafetyPatch | None = None,
        config: NLSRConfig | None = None,
        tokenizer: Any | None = None,
        inputs: Mapping[str, Any] | None = None,
        hub_kwargs: Mapping[str, Any] | None = None,
        dtype: str | None = None,
        device: str | None = None,
        strict_base: bool = True,
        max_memory: str | Mapping[Any, Any] | None = None,
        offload_folder: str | Path | None = None,
    ) -> None:
        if aligned is None and reference is None and safety_patch is None:
            raise ValueError("Pass `aligned` (to build the EXPO reference), `reference` or `safety_patch`.")
        if config is not None and not isinstance(config, NLSRConfig):
            raise TypeError(f"`config` must be an NLSRConfig (got {type(config).__name__}); build one with "
                            "`NLSRConfig(...)` or `NLSRConfig.from_yaml(text)`.")
        _check_inputs(finetuned=finetuned, aligned=aligned, reference=reference, weak=weak, safety_patch=safety_patch)
        resolve_dtype(dtype)  # cheap checks first: a bad dtype or device fails now, not after loading the model
        check_device(device)
        self.config = config or NLSRConfig.preset("default")
        self.finetuned = finetuned
        self.aligned, self.weak, self._reference = aligned, weak, reference
        self._built_reference = False
        self._supplied_patch = safety_patch
        self._computed_patches: dict[str | None, SafetyPatch] = {}
        self._last_patch: SafetyPatch | None = None
        self._base = base
        self._model: Any | None = None if isinstance(base, (str, Path)) or base is None else base
        self._tokenizer = tokenizer
        self.inputs: dict[str, Any] = dict(inputs or {})
        self._hub_kwargs = dict(hub_kwargs or {})
        self._dtype, self._device = dtype, device
        self._max_memory, self._offload_folder = parse_max_memory(max_memory), offload_folder  # checked before loading
        if strict_base:
            check_same_base({r: a for r, a in (("aligned", aligned), ("weak", weak), ("reference", reference),
                                               ("finetuned", finetuned)) if a is not None})
        if self.config.compat and weak is not None:
            raise ValueError("`compat=True` reproduces the published code, which has no weak adapter; drop `weak`.")

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path | None,
        *,
        finetuned: str | Path | None = None,
        aligned: str | Path | None = None,
        reference: str | Path | None = None,
        weak: str | Path | None = None,
        safety_patch: str | Path | None = None,
        config: NLSRConfig | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        allow_pickle: bool = False,
        dtype: str | None = None,
        device: str | None = None,
        strict_base: bool = True,
        max_memory: str | Mapping[Any, Any] | None = None,
        offload_folder: str | Path | None = None,
    ) -> NLSRPatcher:
        """Resolve every input (local folder, ``org/name``, ``org/name@revision``, ``org/name:subfolder``)
        and read the adapters. The base model is loaded later, only if a calibration pass is needed.

        Args:
            base: the base model every adapter sits on (not needed with a `safety_patch`).
            finetuned: the user's fine-tuned LoRA adapter (optional when only a safety patch is built, or when
                adapters are passed to `realign(finetuned=...)` one by one).
            aligned: the safety-aligned LoRA adapter (EXPO reference source).
            reference: a ready safety reference adapter (replaces EXPO).
            weak: EXPO's weak adapter (default: the base model itself).
            safety_patch: a saved safety patch; skips the reference and the calibration pass.
            config: the `NLSRConfig` (defaults follow the paper).
            revision, token, cache_dir, local_files_only, force_download: Hub options, as in huggingface_hub;
                ``@revision`` in a reference wins over `revision`.
            allow_pickle: accept pickled ``adapter_model.bin`` weights (off by default).
            max_memory, offload_folder: load the base for the calibration pass with accelerate's
                ``device_map="auto"`` and CPU/disk offload (``{0: "20GiB", "cpu": "60GiB"}``; see `nlsr_hub.offload`);
                without them offload is used only when the base does not fit the device.
        """
        hub = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only,
               "force_download": force_download}
        inputs: dict[str, Any] = {}
        adapters: dict[str, LoraAdapter | None] = {}
        for role, spec in (("finetuned", finetuned), ("aligned", aligned), ("reference", reference),
                           ("weak", weak)):
            if spec is None:
                adapters[role] = None
                continue
            resolved = resolve(spec, **hub)
            inputs[role] = resolved.lineage()
            adapters[role] = load_adapter(resolved.local_path, allow_pickle=allow_pickle)
        patch = None
        if safety_patch is not None:
            resolved = resolve(safety_patch, files=PATCH_FILES, **hub)
            inputs["safety_patch"] = resolved.lineage()
            patch = SafetyPatch.from_pretrained(resolved.local_path)
        if base is not None:
            inputs["base"] = {"spec": str(base)}
        return cls(
            finetuned=adapters["finetuned"], base=base, aligned=adapters["aligned"], reference=adapters["reference"],
            weak=adapters["weak"], safety_patch=patch, config=config, inputs=inputs,
            hub_kwargs={k: v for k, v in hub.items() if k != "force_download"}, dtype=dtype, device=device,
            strict_base=strict_base, max_memory=max_memory, offload_folder=offload_folder,
        )

    def _load_model(self) -> tuple[Any, Any]:
        if self._model is not None and self._tokenizer is not None:
            return self._model, self._tokenizer
        if self._base is None:
            raise ValueError("A calibration pass needs the base model: pass `base` (a local folder or Hub id).")
        if self._model is None:
            resolved: ResolvedInput = resolve(self._base, files=(), patterns=MODEL_PATTERNS, **self._hub_kwargs)
            self.inputs["base"] = resolved.lineage()
            kwargs = {"local_files_only": True} if resolved.repo_id else {}
            path = resolved.local_path
            check_unquantised_checkpoint(path)
            if use_offload(path, dtype=self._dtype, device=self._device, max_memory=self._max_memory):
                self._model, tokenizer = load_offloaded(path, dtype=self._dtype, max_memory=self._max_memory,
                                                        offload_folder=self._offload_folder, **kwargs)
            else:
                self._model, tokenizer = load_base_model(str(path), dtype=self._dtype, device=self._device, **kwargs)
            self._tokenizer = self._tokenizer or tokenizer
        if self._tokenizer is None:
            raise ValueError("A base model object was passed without its tokenizer: pass `tokenizer` too.")
        return self._model, self._tokenizer

    # ------------------------------------------------------------------------------------------ steps

    def reference_adapter(self) -> LoraAdapter:
        """The safety reference: supplied, or EXPO-extrapolated from the aligned adapter."""
        if self._reference is None:
            if self.aligned is None:
                raise ValueError("No reference: pass `aligned` or `reference`.")
            self._reference = build_reference(self.aligned, self.weak, beta=self.config.beta,
                                              compat=self.config.compat)
            self._built_reference = True
        return self._reference

    def _reference_source(self) -> str:
        """How the reference was made: ``expo`` (aligned adapter only), ``expo+weak`` or ``supplied``."""
        if self.aligned is None or (self._reference is not None and not self._built_reference):
            return "supplied"
        return "expo+weak" if self.weak is not None else "expo"

    def safety_patch(self, calibration: Any = None, *, progress: bool = True) -> SafetyPatch:
        """The reference's safety-critical masks: supplied, or computed with one calibration pass (skipped for
        scorers that need no statistics). The computed patch is cached per calibration data: the same data
        reuses it, other data computes a new one, and ``calibration=None`` reuses the last computed patch (the
        built-in calibration set is used only when none was computed yet)."""
        if self._supplied_patch is not None:
            return self._supplied_patch
        if calibration is None and self._last_patch is not None:
            return self._last_patch
        config = self.config
        scorer = get_scorer(config.effective_scorer)  # compat: low_rank runs block by block, as published
        pairs = load_calibration(calibration, limit=config.max_calibration_samples) if scorer.needs else None
        key = fingerprint(pairs) if pairs is not None else None
        cached = self._computed_patches.get(key)
        if cached is not None:
            self._last_patch = cached
            return cached
        reference = self.reference_adapter()
        if self.finetuned is not None:  # fail before minutes of forward passes, not after
            nlsr = config.restorer == "nlsr"  # only the factor-level engine needs a shared LoRA basis
            check_compatible_modules(reference, self.finetuned, granularity=config.granularity if nlsr else "row",
                                     restoration=config.effective_restoration if nlsr else "neuron")
        stats, calibration_meta = None, {}
        if pairs is not None:
            check_peft_config(reference)
            model, tokenizer = self._load_model()
            stats = collect_statistics(model, tokenizer, reference, pairs, needs=scorer.needs,
                                       batch_size=config.batch_size, max_length=config.max_length, progress=progress,
                                       sparsity_ratio=config.sparsity_ratio, compat=config.compat)
            check_finite_statistics(stats)
            tokens = max((s.tokens for s in stats.values()), default=0)
            calibration_meta = {"samples": len(pairs), "response_tokens": tokens, "sha256": key,
                                "source": "built-in" if calibration is None else type(calibration).__name__}
        metadata = {
            "scorer": config.effective_scorer, "mask_rule": config.effective_mask_rule,
            "sparsity_ratio": config.sparsity_ratio, "granularity": config.granularity,
            "beta": config.beta, "compat": config.compat, "seed": config.seed, "calibration": calibration_meta,
            "inputs": {k: v for k, v in self.inputs.items() if k in ("base", "aligned", "weak", "reference")},
            "reference_source": self._reference_source(),
        }
        patch = build_safety_patch(
            reference, stats, scorer=config.effective_scorer, sparsity_ratio=config.sparsity_ratio,
            granularity=config.granularity, compat=config.compat, seed=config.seed, metadata=metadata,
            mask_rule=config.effective_mask_rule,
        )
        self._computed_patches[key] = patch
        self._last_patch = patch
        return patch

    def _target(self, finetuned: LoraAdapter | None) -> LoraAdapter:
        target = self.finetuned if finetuned is None else finetuned
        if target is None:
            raise ValueError("No fine-tuned adapter to realign: pass `finetuned` to `from_pretrained` or `realign`.")
        return target

    def _restore(
        self, calibration: Any, finetuned: LoraAdapter | None, finetuned_lineage: Mapping[str, Any] | None,
        progress: bool, build: bool,
    ) -> tuple[RealignmentPlan, SafetyPatch | None, LoraAdapter | None]:
        """Run the configured restorer: the plan, the safety patch it used (if any) and the new adapter."""
        target = self._target(finetuned)
        restorer = get_restorer(self.config.restorer)
        patch, aligned = None, self.aligned
        if restorer.needs == "patch":
            patch = self.safety_patch(calibration, progress=progress)
            if finetuned is not None:
                check_same_base({"reference": patch.reference, "finetuned": target})
            calibration_meta = patch.metadata.get("calibration", {})
        else:
            if aligned is None and self._supplied_patch is not None:
                aligned = self._supplied_patch.aligned_update()  # EXPO without a weak adapter is invertible
            if aligned is None:
                raise ValueError(f"Restorer {restorer.name!r} needs the aligned adapter itself; pass `aligned=`.")
            if finetuned is not None:
                check_same_base({"aligned": aligned, "finetuned": target})
            calibration_meta = {}
        inputs = dict(self.inputs)  # after the calibration pass, which records the base model's lineage
        if finetuned_lineage is not None:
            inputs["finetuned"] = dict(finetuned_lineage)
        restore_inputs = RestoreInputs(finetuned=target, aligned=aligned, patch=patch, lineage=inputs,
                                       calibration=calibration_meta, progress=progress)
        plan, adapter = restore(restore_inputs, self.config, build=build)
        return plan, patch, adapter

    def plan(
        self,
        calibration: Any = None,
        *,
        finetuned: LoraAdapter | None = None,
        finetuned_lineage: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> RealignmentPlan:
        """Similarity and decision for every module (no weights are built). `finetuned` replaces the
        patcher's own fine-tuned adapter (batch mode: one safety patch, many adapters)."""
        return self._restore(calibration, finetuned, finetuned_lineage, progress, build=False)[0]

    def realign(
        self,
        calibration: Any = None,
        *,
        dry_run: bool = False,
        finetuned: LoraAdapter | None = None,
        finetuned_lineage: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> RealignmentResult:
        """Plan and, unless `dry_run`, build the realigned adapter with the configured restorer
        (``config.restorer``, see `nlsr_hub.restorers`). The inputs are never modified.

        Args:
            calibration: safe (prompt, response) pairs — a list, a JSON/JSONL path or a `datasets` split;
                None uses the built-in set. Ignored when a safety patch was supplied, and by restorers that
                need no calibration pass (``addback``, ``interpolate``, ``safelora``).
            dry_run: return the plan only (``result.adapter is None``).
            finetuned: realign this adapter instead of the patcher's own, reusing the safety patch.
        """
        plan, patch, adapter = self._restore(calibration, finetuned, finetuned_lineage, progress, build=not dry_run)
        return RealignmentResult(plan=plan, adapter=adapter, config=self.config, safety_patch=patch)

    def _with_config(self, config: NLSRConfig) -> NLSRPatcher:
        """A twin sharing this patcher's model, inputs and reference, with its own config and safety patches."""
        twin = copy.copy(self)
        twin.config = config
        twin._computed_patches, twin._last_patch = {}, None
        return twin

    def choose(
        self,
        calibration: Any = None,
        *,
        candidates: Mapping[str, Mapping[str, Any]] | None = None,
        probes: Sequence[str] | None = None,
        utility: Any = None,
        tolerance: float | None = None,
        finetuned: LoraAdapter | None = None,
        finetuned_lineage: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> RealignmentResult:
        """Realign with every candidate restorer configuration and keep the one measured safest (`nlsr_hub.choice`).

        Each candidate's realigned model answers the `probes` (harmful prompts; default: the first 64 calibration
        prompts) and its non-refusal rate is measured with the keyword refusal judge; with `utility` rows of the
        user's own task (``(prompt, response)`` pairs, any calibration source), their mean response NLL is measured
        too and a candidate whose NLL rose by more than `tolerance` (nats per token) over the fine-tuned adapter's is
        passed over. The result is the chosen candidate's, and its plan records every measurement (``choice``).

        Args:
            candidates: label -> `NLSRConfig` changes (``{"preset": name}`` starts from a preset); default
                `choice.CANDIDATES` (the default, the paper's NLSR, halfway interpolation). Each keeps this
                patcher's run settings (`choice.RUN_FIELDS`: beta, seed, calibration sizes).
        """
        from .choice import (
            Choice,
            candidate_configs,
            check_tolerance,
            choice_table,
            encode_utility,
            measure,
            pick,
            probe_prompts,
        )

        if self._supplied_patch is not None:
            raise ValueError("`choose` realigns with several configurations, and a saved safety patch holds one "
                             "configuration's masks: pass the aligned adapter (or a reference) and the base model.")
        tolerance = check_tolerance(tolerance)
        configs = candidate_configs(self.config, candidates)  # every candidate checked before any work
        needs_aligned = [label for label, (_, config) in configs.items()
                         if get_restorer(config.restorer).needs == "aligned"]
        if needs_aligned and self.aligned is None:
            raise ValueError(f"Candidate {needs_aligned[0]!r} needs the aligned adapter itself: pass `aligned=` "
                             "(not only a reference), or leave that candidate out.")
        target = self._target(finetuned)
        prompts = probe_prompts(probes, calibration, limit=self.config.max_calibration_samples)
        utility_rows = _utility_rows(utility)
        model, tokenizer = self._load_model()
        utility_samples = encode_utility(tokenizer, utility_rows) if utility_rows else None
        self.reference_adapter()  # built once, shared by every candidate

        def probe(adapter: LoraAdapter, label: str) -> Any:
            return measure(model, tokenizer, adapter, prompts, utility_samples, batch_size=self.config.batch_size,
                           progress=progress, desc=f"nlsr: probe {label}")

        before = probe(target, "fine-tuned")
        tried = []
        for label, (changes, config) in configs.items():
            result = self._with_config(config).realign(calibration, finetuned=target,
                                                       finetuned_lineage=finetuned_lineage, progress=progress)
            tried.append((label, changes, probe(result.adapter, label), result))
        index, reason = pick(before, [m for _, _, m, _ in tried], tolerance)
        label, _, _, chosen = tried[index]
        choice = Choice(before, tuple((lab, ch, m) for lab, ch, m, _ in tried), label, tolerance, reason)
        seconds = ", ".join(f"{lab} {m.seconds:.0f} s" for lab, _, m, _ in tried)
        logger.info("nlsr: measured choice (probes: fine-tuned %.0f s, %s)\n%s", before.seconds, seconds,
                    choice_table(choice.to_dict()))
        plan = dataclasses.replace(chosen.plan, choice=choice.to_dict())
        return RealignmentResult(plan=plan, adapter=chosen.adapter, config=chosen.config,
                                 safety_patch=chosen.safety_patch)
