#!/usr/bin/env python
"""Megatron tools/preprocess_data.py command line (same flags) -> {prefix}_{key}_document.bin/.idx: the same as `megaocto preprocess-megatron ...` (see docs/data-preprocess.md; --help lists the flags)."""
import sys

from megaocto.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess-megatron", *sys.argv[1:]]))
