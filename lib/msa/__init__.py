"""MSA: Medical SAM Adapter on SAM and LiteMedSAM backbones.

The names below are imported on first use (PEP 562): `import msa` and `msa --help` do not pay for
torch and segment_anything until something needs them.
"""

from importlib import import_module

from .errors import CheckpointError, ImageError, MSAError, PromptError

_LAZY = {
    "describe_checkpoint": ".checkpoint", "load_adapters": ".checkpoint", "load_backbone": ".checkpoint",
    "read_adapter_metadata": ".checkpoint", "save_adapters": ".checkpoint",
    "Adapter": ".modeling.adapter", "AdapterConfig": ".modeling.adapter",
    "BACKBONES": ".modeling.build", "adapt": ".modeling.build", "build_backbone": ".modeling.build",
    "build_model": ".modeling.build",
    "MSA": ".modeling.msa", "MSAConfig": ".modeling.msa", "count_parameters": ".modeling.msa",
    "is_trainable": ".modeling.msa",
}

__all__ = sorted([*_LAZY, "CheckpointError", "ImageError", "MSAError", "PromptError"])


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'msa' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
