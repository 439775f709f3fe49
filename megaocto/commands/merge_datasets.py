"""`megaocto merge-datasets`: concatenate .bin/.idx datasets (e.g. preprocess shards) in order."""
from __future__ import annotations

NAME = "merge-datasets"
HELP = "Concatenate Megatron .bin/.idx datasets (prefixes or directories of shards) into one"


def add_arguments(parser):
    parser.add_argument("--input", nargs="+", required=True,
                        help="dataset prefixes, or directories whose datasets (matching --pattern) are merged "
                             "in numeric shard / natural name order; a `preprocess --no-join` shard directory of "
                             "several keys (inputs, targets) is merged per key")
    parser.add_argument("--pattern", default="*.idx", help="glob inside input directories, e.g. '*_text_document.idx' "
                                                       "(default: %(default)s)")
    parser.add_argument("--output-prefix", required=True,
                        help="writes OUTPUT_PREFIX.bin/.idx, or OUTPUT_PREFIX_{key}_document.bin/.idx per key when "
                             "the inputs hold shards of several keys")


def run(args) -> int:
    from megaocto.data.cli_errors import run_cleanly

    return run_cleanly(NAME, _run, args)


def _run(args) -> int:
    from megaocto.data.indexed import dataset_prefix, merge_datasets, resolve_dataset_groups

    groups = resolve_dataset_groups(args.input, args.pattern)
    for key, prefixes in groups.items():
        out = args.output_prefix if key is None else dataset_prefix(args.output_prefix, key)
        ds = merge_datasets(prefixes, out)
        print(f"merged {len(prefixes)} datasets into {out}: {ds.num_docs} docs, "
              f"{len(ds)} sequences, {ds.num_tokens:,} tokens ({ds.dtype.__name__})")
    return 0
