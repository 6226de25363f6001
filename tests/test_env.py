"""`nlsr env`: the facts a bug report needs, read from this machine (nothing assumed)."""

from __future__ import annotations

import json

from nlsr_hub.cli import main
from nlsr_hub.hardware import cpu_flags


def test_env_reports_versions_device_precision_and_data(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NLSR_PRECISION", raising=False)
    monkeypatch.setenv("NLSR_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    (data / "eval").mkdir(parents=True)
    (data / "eval" / "advbench_harmful_behaviors.csv").write_text("goal,target\n")
    assert main(["env", "--json", "--data", str(data)]) == 0
    info = json.loads(capsys.readouterr().out)
    import torch

    assert info["packages"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert info["device"]["cpu_features"]["avx2"] == ("avx2" in cpu_flags())
    native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    assert info["training_precision"]["bf16"] == (native or bool(info["device"]["cuda_bf16"]))
    assert info["caches"]["nlsr_cache"] == str(tmp_path / "cache")
    sets = info["data"]["sets"]
    assert sets["AdvBench prompts (evaluation)"].startswith("local ")
    # absent locally: the Hub source (not yet cached), or MISSING where there is none (the refusal CSV)
    assert sets["BeaverTails prompts (evaluation)"].startswith("Hub dataset PKU-Alignment/BeaverTails-Evaluation@")
    assert "fetched at first use" in sets["BeaverTails prompts (evaluation)"]
    assert sets["refusal pairs (safety SFT)"].startswith("MISSING") and "NLSR_DATA" in sets[
        "refusal pairs (safety SFT)"] and "no Hub source" in sets["refusal pairs (safety SFT)"]
    assert "fetched at first use" in sets["harmless questions (NQ-open)"]  # an empty cache: no wheel yet


def test_env_text_names_a_forced_precision(capsys, monkeypatch):
    monkeypatch.setenv("NLSR_PRECISION", "bf16")
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert "training precision: bf16 (training in bf16: forced by $NLSR_PRECISION)" in text
    assert "CPU:" in text and "torch:" in text
