"""msa.trainers: MSA fine-tuning with simulated prompts (and distributed runs under torchrun)."""

from .finetune import TrainConfig, init_distributed, selection_score, train

__all__ = ["TrainConfig", "init_distributed", "selection_score", "train"]
