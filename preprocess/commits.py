#!/usr/bin/env python
"""single-file commits of a local git repository -> CommitPack-schema jsonl: the same as `megaocto commits ...` (see docs/data-preprocess.md)."""
import sys

from megaocto.cli import main

if __name__ == "__main__":
    sys.exit(main(["commits", *sys.argv[1:]]))
