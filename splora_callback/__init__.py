"""splora-callback: keep LoRA fine-tuning from quietly breaking a chat model's safety alignment.

Data flows one way: model -> LoRA layers -> alignment subspace -> scores -> selection -> action ->
report. See README.md and docs/ediem.md.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # static analysis sees the real imports
    from .alignment import AlignmentMismatchError, AlignmentSubspace
    from .base_models import infer_base_model
    from .callback import SPLoRACallback
    from .checkpoint import CheckpointError, SafetensorsCheckpoint
    from .config import SPLoRAConfig
    from .dashboard import write_html_report
    from .layers import LoraUpdate, NoLoraLayersError, UnsupportedAdapterError, lora_updates_from_model
    from .model_card import push_adapter_to_hub
    from .patch import safety_patch
    from .probe import SafetyProbe, UtilityProbe
    from .pruning import ActionReport, apply_action, prune_components, prune_layers, save_acted_adapter
    from .repair import measured_stop, repair_selection
    from .scoring import LayerScore, LayerScores, score_layers
    from .selection import random_layers, random_matched, select_layers

# Public names are imported on first use (PEP 562): `import splora_callback` (and `splora --help`) stays
# fast; `from splora_callback import SPLoRACallback` imports what that name needs.
_EXPORTS = {
    "ActionReport": ".pruning",
    "AlignmentMismatchError": ".alignment",
    "AlignmentSubspace": ".alignment",
    "apply_action": ".pruning",
    "CheckpointError": ".checkpoint",
    "infer_base_model": ".base_models",
    "LayerScore": ".scoring",
    "LayerScores": ".scoring",
    "lora_updates_from_model": ".layers",
    "LoraUpdate": ".layers",
    "measured_stop": ".repair",
    "NoLoraLayersError": ".layers",
    "prune_components": ".pruning",
    "prune_layers": ".pruning",
    "push_adapter_to_hub": ".model_card",
    "random_layers": ".selection",
    "random_matched": ".selection",
    "repair_selection": ".repair",
    "safety_patch": ".patch",
    "SafetensorsCheckpoint": ".checkpoint",
    "SafetyProbe": ".probe",
    "save_acted_adapter": ".pruning",
    "score_layers": ".scoring",
    "select_layers": ".selection",
    "SPLoRACallback": ".callback",
    "SPLoRAConfig": ".config",
    "UnsupportedAdapterError": ".layers",
    "UtilityProbe": ".probe",
    "write_html_report": ".dashboard",
}

__version__ = "0.1.0"

__all__ = [
    "ActionReport",
    "AlignmentMismatchError",
    "AlignmentSubspace",
    "CheckpointError",
    "LayerScore",
    "LayerScores",
    "LoraUpdate",
    "NoLoraLayersError",
    "SPLoRACallback",
    "SPLoRAConfig",
    "SafetensorsCheckpoint",
    "SafetyProbe",
    "UnsupportedAdapterError",
    "UtilityProbe",
    "apply_action",
    "infer_base_model",
    "lora_updates_from_model",
    "measured_stop",
    "prune_components",
    "prune_layers",
    "push_adapter_to_hub",
    "random_layers",
    "random_matched",
    "repair_selection",
    "safety_patch",
    "save_acted_adapter",
    "score_layers",
    "select_layers",
    "write_html_report",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
