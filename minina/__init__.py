"""minina: Neural Attention (DiGiugno & Mahmood 2025, arXiv:2502.17206) in small, readable PyTorch."""
from .attention import attention_weights, dot_product_attention, neural_attention, sdpa_attention
from .models import TransformerLM, VisionTransformer
from .modules import Block, MultiHeadAttention
from .scores import NeuralScore

__version__ = "0.1.0"
__all__ = ["dot_product_attention", "sdpa_attention", "neural_attention", "attention_weights",
           "NeuralScore", "MultiHeadAttention", "Block", "TransformerLM", "VisionTransformer"]
