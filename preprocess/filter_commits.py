#!/usr/bin/env python
"""CommitPackFT filters (commitpackft_filters1/2) over CommitPack jsonl: the same as `megaocto filter-commits ...` (see docs/data-preprocess.md)."""
import sys

from megaocto.cli import main

if __name__ == "__main__":
    sys.exit(main(["filter-commits", *sys.argv[1:]]))
