"""Our Llama-family model implementation and its Hugging Face loader."""

from replica.models.llama import AttentionMetadata, LlamaForCausalLM
from replica.models.loader import load_model

__all__ = ["AttentionMetadata", "LlamaForCausalLM", "load_model"]
