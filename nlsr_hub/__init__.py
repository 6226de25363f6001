"""nlsr-hub: Neuron-Level Safety Realignment (NLSR) for PEFT LoRA adapters, without training."""

from .adapters import AdapterError, LoraAdapter, LoraModule, load_adapter, save_adapter
from .calibration import CalibrationPair, load_calibration
from .config import NLSRConfig
from .fullft import FullFinetuneResult, realign_full_finetune
from .inmemory import realign_peft_model
from .patcher import NLSRPatcher
from .plan import ModuleDecision, RealignmentPlan
from .reference import build_reference
from .result import RealignmentResult
from .safety_patch import SafetyPatch
from .scoring import SCORERS, register_scorer

__version__ = "0.1.0"

__all__ = [
    "SCORERS",
    "AdapterError",
    "CalibrationPair",
    "FullFinetuneResult",
    "LoraAdapter",
    "LoraModule",
    "ModuleDecision",
    "NLSRConfig",
    "NLSRPatcher",
    "RealignmentPlan",
    "RealignmentResult",
    "SafetyPatch",
    "__version__",
    "build_reference",
    "load_adapter",
    "load_calibration",
    "realign_full_finetune",
    "realign_peft_model",
    "register_scorer",
    "save_adapter",
]
