"""Named grid settings: ``tiny`` (tests), ``demo`` (the README demo), ``quick`` (2-core CPU, < 1 h), ``full``
(GPU, the paper's sizes)."""

from __future__ import annotations

import dataclasses

from .evaluate import EvalSettings
from .settings import GridSettings
from .train import METHODS, TrainSettings

QUICK = GridSettings(
    preset="quick", methods=("sft",), align_refusals=200, align_harmless=200, align_preferences=100,
    harmless_answer_tokens=48, attack_n={"sst2": 250, "ag_news": 150, "gsm8k": 80},
    ablations=(("row granularity", {"granularity": "row"}),
               ("row granularity, beta 3", {"granularity": "row", "beta": 3.0}), ("beta 0", {"beta": 0.0})),
    eval=EvalSettings(advbench=40, beavertails=40, harmless=20, hs_new_tokens=32,
                      fa={"sst2": 100, "ag_news": 60, "gsm8k": 30}),
)

# The restorers' head-to-head pair (`headtohead.HeadToHeadSettings.pair`), pinned: its adapters and every point
# measured on them (results/restorers/) are cached under these settings. It was the demo's until 2026-11-30.
PAIR = GridSettings(
    preset="pair", focus_only=True, other_tasks=(), scorers=(), ablations=(), evaluate_safelora=False,
    evaluate_base=False, evaluate_reference=False,
    align_refusals=150, align_harmless=150, attack_n={"sst2": 200}, calibration_prompts=80,
    eval=EvalSettings(advbench=30, beavertails=30, harmless=20, hs_new_tokens=32, fa={"sst2": 100}),
    # the preference pair (DPO on the SFT-merged model): 150 + 150 pairs, 38 steps
    align_preferences=150, preference=TrainSettings(lr=1e-4, epochs=1, max_length=192, beta=0.1),
)

# `nlsr demo`: the pair's data and sizes, cut to fit 15 minutes from empty caches on a 2-core CPU without native
# bf16 (issue #13): one alignment epoch at a higher rate, batches grouped by length, and no paper-settings row
# (the head-to-head measures it on larger sets).
DEMO = dataclasses.replace(
    PAIR, preset="demo", evaluate_paper=False,
    align=TrainSettings(lr=5e-4, epochs=1, max_length=192, group_by_length=True),
    attack=TrainSettings(lr=2e-4, epochs=1, max_length=160, group_by_length=True),
)

FULL = GridSettings(
    preset="full", methods=METHODS, align_refusals=1015, align_harmless=1000, align_preferences=2000,
    harmless_held_out=100,
    align=TrainSettings(lr=2e-4, epochs=2, max_length=256, rank=128, alpha=256, batch_size=16),
    preference=TrainSettings(lr=5e-5, epochs=1, max_length=384, rank=128, alpha=256, batch_size=16, beta=0.1),
    attack=TrainSettings(lr=1e-4, epochs=1, max_length=256, rank=128, alpha=256, batch_size=8),
    attack_max_length={"sst2": 256, "ag_news": 384, "gsm8k": 512},
    attack_n={"sst2": None, "ag_news": None, "gsm8k": None}, calibration_prompts=400, calibration_tokens=128,
    nlsr={"max_calibration_samples": 2000, "max_length": 384},
    eval=EvalSettings(advbench=None, beavertails=None, harmless=100, hs_new_tokens=128,
                      fa={"sst2": None, "ag_news": 500, "gsm8k": 500}, gsm8k_new_tokens=200, batch_size=32),
)

TINY = GridSettings(
    preset="tiny", model="tiny", align_refusals=8, align_harmless=8, align_preferences=8, harmless_answer_tokens=8,
    harmless_held_out=4,
    align=TrainSettings(max_steps=1, batch_size=4, max_length=256, rank=4, alpha=8, bf16=False),
    preference=TrainSettings(max_steps=1, batch_size=4, max_length=256, rank=4, alpha=8, bf16=False),
    attack=TrainSettings(max_steps=1, batch_size=4, max_length=256, rank=4, alpha=8, bf16=False),
    attack_max_length={"sst2": 512}, attack_n={"sst2": 8, "ag_news": 8, "gsm8k": 8}, sst2_ps=(0.0, 0.05),
    other_tasks=(),
    calibration_prompts=6, calibration_tokens=8, nlsr={"max_calibration_samples": 8, "max_length": 64},
    scorers=("wanda",), ablations=(("fraction 0.2", {"selection": "fraction", "fraction": 0.2}),),
    safelora_lowest=(0.5,),
    eval=EvalSettings(advbench=3, beavertails=3, harmless=2, hs_new_tokens=4, fa={"sst2": 3}, batch_size=4),
    validate_judge=False,
)

PRESETS = {"tiny": TINY, "demo": DEMO, "pair": PAIR, "quick": QUICK, "full": FULL}
