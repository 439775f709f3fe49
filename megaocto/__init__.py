"""megaocto: Megatron-style tensor-parallel training for instruction-tuning code LLMs."""

__version__ = "0.1.0"
