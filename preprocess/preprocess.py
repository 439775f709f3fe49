#!/usr/bin/env python
"""jsonl -> Megatron .bin/.idx in megaocto's formats (text, commits-*, qa, magicoder, ...): the same as `megaocto preprocess ...` (see docs/data-preprocess.md; --help lists the options)."""
import sys

from megaocto.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
