#!/usr/bin/env python
"""concatenate .bin/.idx datasets (Megatron tools/merge_datasets.py: --input DIR --output-prefix P): the same as `megaocto merge-datasets ...` (see docs/data-preprocess.md)."""
import sys

from megaocto.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge-datasets", *sys.argv[1:]]))
