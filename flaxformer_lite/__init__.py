"""flaxformer_lite: the Transformer and its descendants as pure Flax (linen) functions."""

from flaxformer_lite.attention import (MultiHeadAttention, attention_weights, combine_masks,
                                       dot_product_attention, make_causal_mask, make_padding_mask)
from flaxformer_lite.blocks import DecoderLayer, EncoderLayer, LayerStack
from flaxformer_lite.config import PRESETS, TransformerConfig
from flaxformer_lite.decoding import beam_search, generate, sample_logits
from flaxformer_lite.generation import GenerationSettings
from flaxformer_lite.bert import BertEncoder
from flaxformer_lite.models import GPT, Transformer
from flaxformer_lite.speech import SpeechTransformer
from flaxformer_lite.nnx_bridge import to_nnx

__all__ = [
    'BertEncoder', 'DecoderLayer', 'EncoderLayer', 'GPT', 'GenerationSettings', 'LayerStack',
    'MultiHeadAttention', 'PRESETS', 'SpeechTransformer', 'Transformer', 'TransformerConfig',
    'attention_weights', 'beam_search', 'combine_masks', 'dot_product_attention', 'generate',
    'make_causal_mask', 'make_padding_mask', 'sample_logits', 'to_nnx',
]
