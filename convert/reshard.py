#!/usr/bin/env python
"""reshard a megaocto checkpoint to another tensor-parallel size: the same as `megaocto convert reshard ...` (see docs/convert.md; --help lists the options)."""
import sys

from megaocto.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "reshard", *sys.argv[1:]]))
