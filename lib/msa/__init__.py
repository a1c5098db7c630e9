"""MSA: Medical SAM Adapter on SAM and LiteMedSAM backbones."""

from .checkpoint import load_adapters, load_backbone, read_adapter_metadata, save_adapters
from .errors import CheckpointError, ImageError, MSAError, PromptError
from .modeling.adapter import Adapter, AdapterConfig
from .modeling.build import BACKBONES, adapt, build_backbone, build_model
from .modeling.msa import MSA, MSAConfig, count_parameters, is_trainable

__all__ = [
    "BACKBONES", "MSA", "Adapter", "AdapterConfig", "CheckpointError", "ImageError", "MSAConfig", "MSAError",
    "PromptError", "adapt", "build_backbone", "build_model", "count_parameters", "is_trainable",
    "load_adapters", "load_backbone", "read_adapter_metadata", "save_adapters",
]
