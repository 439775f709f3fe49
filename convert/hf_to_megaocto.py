#!/usr/bin/env python
"""Hugging Face model directory -> megaocto checkpoint: the same as `megaocto convert from-hf ...` (see docs/convert.md; --help lists the options)."""
import sys

from megaocto.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "from-hf", *sys.argv[1:]]))
