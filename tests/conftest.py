"""Shared fixtures. The Hub environment is fixed here, before any Hugging Face library is imported."""

from __future__ import annotations

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="nlsr-test-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")  # never the real Hub; tests start their own
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.pop("HF_TOKEN", None)
