"""splora-callback: keep LoRA fine-tuning from quietly breaking a chat model's safety alignment.

Data flows one way: model -> LoRA layers -> alignment subspace -> scores -> selection -> action ->
report. See README.md and docs/ediem.md.
"""

from .alignment import AlignmentMismatchError, AlignmentSubspace
from .callback import SPLoRACallback
from .checkpoint import CheckpointError, SafetensorsCheckpoint
from .config import SPLoRAConfig
from .dashboard import write_html_report
from .layers import LoraUpdate, NoLoraLayersError, UnsupportedAdapterError, lora_updates_from_model
from .probe import SafetyProbe
from .pruning import ActionReport, apply_action, prune_layers, save_acted_adapter
from .scoring import LayerScore, LayerScores, score_layers
from .selection import random_layers, random_matched, select_layers

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
    "apply_action",
    "lora_updates_from_model",
    "prune_layers",
    "random_layers",
    "random_matched",
    "save_acted_adapter",
    "score_layers",
    "select_layers",
    "write_html_report",
]
