#!/usr/bin/env python
"""megaocto checkpoint -> Hugging Face model directory: the same as `megaocto convert to-hf ...` (see docs/convert.md; --help lists the options)."""
import sys

from megaocto.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "to-hf", *sys.argv[1:]]))
