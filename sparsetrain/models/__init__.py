"""Causal-LM pre-training modules built from `transformers` configs."""

from .causal_lm import MODEL_TYPES, CausalLMModule, build_hf_config
from .schedule import warmup_cosine_lr

__all__ = ["MODEL_TYPES", "CausalLMModule", "build_hf_config", "warmup_cosine_lr"]
