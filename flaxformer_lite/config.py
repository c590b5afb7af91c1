"""TransformerConfig: the one frozen object every module reads, and its named presets."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

ACTIVATIONS = ('relu', 'gelu', 'gelu_tanh', 'silu', 'swiglu', 'geglu')
NORMS = ('layernorm', 'rmsnorm')
NORM_POSITIONS = ('post', 'pre')
POSITIONS = ('sinusoidal', 'learned', 'rotary', 'relative')
ATTENTION_IMPLS = (None, 'xla', 'blockwise', 'cudnn', 'pallas')
REMAT_POLICIES = ('none', 'full', 'dots_saveable')


def _fail(message: str):
  raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters shared by `Transformer`, `BertEncoder` and `GPT`.

  Frozen and hashable, so it can be a `jax.jit` static argument. Every field is checked when the
  object is built; a bad value raises `ValueError` naming it.
  """

  vocab_size: int = 256
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int | None = None  # None: num_heads (multi-head); 1: multi-query; else grouped.
  head_dim: int | None = None  # None: d_model // num_heads.
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  d_ff: int = 256
  # 'relu' | 'gelu' (erf) | 'gelu_tanh' (GPT-2) | 'silu' (Marian's swish) | 'swiglu' |
  # 'geglu' (T5 v1.1's gated gelu: gelu_tanh(wi_gate(x)) * wi(x))
  activation: str = 'relu'
  norm: str = 'layernorm'  # 'layernorm' | 'rmsnorm'
  norm_position: str = 'post'  # 'post' (the paper, BERT) | 'pre' (GPT-2, final norm added)
  norm_eps: float = 1e-5
  # 'sinusoidal' | 'learned' | 'rotary' | 'relative' (T5: a learned bias per head on the
  # attention logits by bucketed distance, one table per stack, shared by its layers)
  positions: str = 'sinusoidal'
  rope_base: float = 10000.0
  relative_buckets: int = 32  # 'relative': buckets of distance (half per direction if bidirectional)
  relative_max_distance: int = 128  # 'relative': distances past this share the last bucket
  position_offset: int = 0  # 'learned': rows of the table before position 0 (BART keeps 2)
  max_len: int = 256
  max_source_len: int | None = None  # the encoder's positions (None: max_len; Whisper: 1500)
  type_vocab_size: int = 2  # BertEncoder's token types.
  num_mel_bins: int = 80  # SpeechTransformer's input features per frame
  audio_strides: tuple = (2, 2)  # SpeechTransformer's two convolutions (Whisper: (1, 2))
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  use_bias: bool = True
  fused_qkv: bool = True  # one input projection for q|k|v in self-attention (k|v in cross)
  tie_embeddings: bool = True  # output projection = transposed token embedding
  scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model), as in the paper
  embed_norm: bool = False  # a norm after embeddings + positions, one per stack (BART)
  final_logits_bias: bool = False  # a bias [V] added to the logits (Marian, BART)
  # Multiply the last hidden state by d_model ** -0.5 before the tied output projection (T5).
  scale_tied_output: bool = False
  attention_scale: float | None = None  # logits scale; None: 1 / sqrt(head_dim) (T5: 1.0)
  init_std: float | None = None  # None: Xavier uniform (the paper, PyTorch); else normal(init_std)
  # Token ids. pad_id None: no padding token (GPT-2); the models then take padding only from
  # explicit `valid` masks. decoder_start_id: the Transformer decoder's first input (None:
  # bos_id; Marian and T5 start with their pad token, which `valid` then keeps unmasked).
  pad_id: int | None = 0
  bos_id: int = 1
  eos_id: int = 2
  decoder_start_id: int | None = None
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32
  attention_impl: str | None = None
  remat: str = 'none'  # 'none' | 'full' | 'dots_saveable'
  scan_layers: bool = False
  # Which of num_kv_heads / head_dim were left None and derived (not a setting: `replace` and
  # `to_dict` use it so a derived value keeps following d_model and num_heads).
  _derived: tuple = dataclasses.field(default=(), init=False, repr=False, compare=False)

  def __post_init__(self):
    # One spelling per dtype, so equal configs hash equally (jnp.float32 vs dtype('float32')).
    for name in ('dtype', 'param_dtype'):
      try:
        object.__setattr__(self, name, jnp.dtype(getattr(self, name)))
      except TypeError:
        _fail(f'{name}={getattr(self, name)!r} is not a dtype')
    self._check_shapes()
    choices = {'activation': ACTIVATIONS, 'norm': NORMS, 'norm_position': NORM_POSITIONS,
               'positions': POSITIONS, 'attention_impl': ATTENTION_IMPLS, 'remat': REMAT_POLICIES}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        _fail(f'{name}={getattr(self, name)!r} is not one of {allowed}')
    # One name each from here on: None resolves to the multi-head count and d_model // heads.
    object.__setattr__(self, '_derived', tuple(
        name for name in ('num_kv_heads', 'head_dim') if getattr(self, name) is None))
    if self.num_kv_heads is None:
      object.__setattr__(self, 'num_kv_heads', self.num_heads)
    if self.head_dim is None:
      object.__setattr__(self, 'head_dim', self.d_model // self.num_heads)
    if self.positions == 'rotary' and self.head_dim % 2:
      _fail(f'rotary positions need an even head_dim, got head_dim={self.head_dim}')
    self._check_numbers()
    self._check_ids()
    self._check_checkpoint_fields()

  def _check_shapes(self):
    for name in ('vocab_size', 'd_model', 'num_heads', 'd_ff', 'max_len', 'type_vocab_size',
                 'num_mel_bins'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        _fail(f'{name}={value!r} must be a positive integer')
    for name in ('num_encoder_layers', 'num_decoder_layers'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        _fail(f'{name}={value!r} must be a non-negative integer')
    if self.head_dim is None and self.d_model % self.num_heads:
      _fail(f'd_model={self.d_model} is not divisible by num_heads={self.num_heads} '
            '(set head_dim explicitly to decouple them)')
    if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
      _fail(f'head_dim={self.head_dim!r} must be a positive integer or None')
    kv = self.num_kv_heads
    if kv is not None and (not isinstance(kv, int) or kv <= 0 or self.num_heads % kv):
      _fail(f'num_heads={self.num_heads} is not divisible by num_kv_heads={kv!r} '
            '(grouped-query attention needs whole groups)')
    if self.max_source_len is not None and (not isinstance(self.max_source_len, int)
                                            or self.max_source_len <= 0):
      _fail(f'max_source_len={self.max_source_len!r} must be a positive integer or None')
    if (not isinstance(self.audio_strides, tuple) or len(self.audio_strides) != 2
        or not all(isinstance(s, int) and s >= 1 for s in self.audio_strides)):
      _fail(f'audio_strides={self.audio_strides!r} must be two positive integers')

  def _check_numbers(self):
    for name in ('dropout_rate', 'attention_dropout_rate'):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        _fail(f'{name}={value!r} must be a number in [0, 1)')
    for name in ('norm_eps', 'rope_base', 'init_std', 'attention_scale'):
      value = getattr(self, name)
      if value is None and name in ('init_std', 'attention_scale'):
        continue
      if not isinstance(value, (int, float)) or not value > 0:
        _fail(f'{name}={value!r} must be a positive number')

  def _check_ids(self):
    for name in ('pad_id', 'bos_id', 'eos_id', 'decoder_start_id'):
      value = getattr(self, name)
      if value is None and name in ('pad_id', 'decoder_start_id'):
        continue
      if not isinstance(value, int) or not 0 <= value < self.vocab_size:
        _fail(f'{name}={value!r} is outside the vocabulary [0, {self.vocab_size})')
    if self.eos_id == self.pad_id:
      _fail(f'eos_id={self.eos_id} equals pad_id: generation marks finished rows with pad_id and '
            'never samples it, so it could never stop')

  def _check_checkpoint_fields(self):
    """The fields the Hugging Face architectures brought (T5's buckets, BART's offset, ...)."""
    for name in ('relative_buckets', 'relative_max_distance'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 2:
        _fail(f'{name}={value!r} must be an integer >= 2')
    if not isinstance(self.position_offset, int) or self.position_offset < 0:
      _fail(f'position_offset={self.position_offset!r} must be a non-negative integer')
    if self.position_offset and self.positions != 'learned':
      _fail(f'position_offset={self.position_offset} needs positions=\'learned\', got '
            f'{self.positions!r}')
    if self.scale_tied_output and not self.tie_embeddings:
      _fail('scale_tied_output=True needs tie_embeddings=True (T5 scales only a tied output)')

  def replace(self, **overrides) -> TransformerConfig:
    """A copy with `overrides`; a derived num_kv_heads / head_dim is derived again."""
    derived = {name: None for name in self._derived if name not in overrides}
    return dataclasses.replace(self, **derived, **overrides)

  def to_dict(self) -> dict:
    """JSON-friendly fields (dtypes by name; a derived num_kv_heads / head_dim as None)."""
    out = dataclasses.asdict(self)
    del out['_derived']
    out.update({name: None for name in self._derived})
    out['dtype'] = jnp.dtype(self.dtype).name
    out['param_dtype'] = jnp.dtype(self.param_dtype).name
    return out

  @classmethod
  def from_dict(cls, fields: dict) -> TransformerConfig:
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f'unknown TransformerConfig fields {unknown}')
    fields = dict(fields)
    for name in ('dtype', 'param_dtype'):
      if isinstance(fields.get(name), str):
        fields[name] = jnp.dtype(fields[name])
    if isinstance(fields.get('audio_strides'), list):  # JSON has no tuples
      fields['audio_strides'] = tuple(fields['audio_strides'])
    return cls(**fields)

  @classmethod
  def preset(cls, name: str, **overrides) -> TransformerConfig:
    """A named configuration, e.g. `TransformerConfig.preset('gpt2-small', dropout_rate=0.0)`."""
    if name not in PRESETS:
      raise ValueError(f'unknown preset {name!r}; expected one of {sorted(PRESETS)}')
    return cls(**{**PRESETS[name], **overrides})


_VASWANI = dict(activation='relu', norm='layernorm', norm_position='post', positions='sinusoidal',
                scale_embeddings=True, tie_embeddings=True, dropout_rate=0.1, max_len=1024,
                vocab_size=37000)
_BERT = dict(vocab_size=30522, d_model=768, num_heads=12, num_encoder_layers=12,
             num_decoder_layers=0, d_ff=3072, activation='gelu', norm_position='post',
             norm_eps=1e-12, positions='learned', max_len=512, init_std=0.02, dropout_rate=0.1)
_GPT2 = dict(vocab_size=50257, d_model=768, num_heads=12, num_encoder_layers=0,
             num_decoder_layers=12, d_ff=3072, activation='gelu_tanh', norm_position='pre',
             norm_eps=1e-5, positions='learned', max_len=1024, init_std=0.02, dropout_rate=0.1,
             pad_id=0, bos_id=50256, eos_id=50256)

PRESETS: dict[str, dict] = {
    # Small enough for tests and CPU demos; the defaults above.
    'tiny': dict(vocab_size=256, d_model=64, num_heads=4, num_encoder_layers=2,
                 num_decoder_layers=2, d_ff=256, max_len=256, dropout_rate=0.1),
    # Twice tiny's width and depth: still minutes on a laptop, for tasks tiny cannot learn.
    'small': dict(vocab_size=256, d_model=128, num_heads=4, num_encoder_layers=4,
                  num_decoder_layers=4, d_ff=512, max_len=256, dropout_rate=0.1),
    'vaswani-base': dict(_VASWANI, d_model=512, num_heads=8, num_encoder_layers=6,
                         num_decoder_layers=6, d_ff=2048),
    'vaswani-big': dict(_VASWANI, d_model=1024, num_heads=16, num_encoder_layers=6,
                        num_decoder_layers=6, d_ff=4096, dropout_rate=0.3),
    'bert-base': _BERT,
    'bert-large': dict(_BERT, d_model=1024, num_heads=16, num_encoder_layers=24, d_ff=4096),
    'gpt2-small': _GPT2,
    'gpt2-medium': dict(_GPT2, d_model=1024, num_heads=16, num_decoder_layers=24, d_ff=4096),
}
