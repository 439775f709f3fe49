"""Checkpoint converters: Hugging Face GPTBigCode / GLM (both ways), original ChatGLM2 import, bigcode Megatron-LM
import and TP resharding. All write megaocto checkpoints through :func:`megaocto.convert.core.write_megaocto_checkpoint`
and read them through :func:`megaocto.convert.core.read_megaocto_checkpoint` (see docs/convert.md)."""
from megaocto.convert.core import (ConversionError, read_megaocto_checkpoint, verify_logits,
                                   write_megaocto_checkpoint)

__all__ = ["ConversionError", "read_megaocto_checkpoint", "verify_logits", "write_megaocto_checkpoint"]
