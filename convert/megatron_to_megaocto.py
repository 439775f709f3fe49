#!/usr/bin/env python
"""bigcode Megatron-LM checkpoint -> megaocto checkpoint: the same as `megaocto convert from-megatron ...` (see docs/convert.md; --help lists the options)."""
import sys

from megaocto.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "from-megatron", *sys.argv[1:]]))
