"""Hugging Face checkpoint layouts, one module an architecture (see `rules` for the scheme)."""

from flaxformer_lite.hf import bart, bert, gpt2, t5, whisper

LAYOUTS = {kind: module.LAYOUT for module in (gpt2, bert, bart, t5, whisper)
           for kind in module.LAYOUT.model_types}
