"""`megaocto merge-datasets`: concatenate .bin/.idx datasets (e.g. preprocess shards) in order."""
from __future__ import annotations

NAME = "merge-datasets"
HELP = "Concatenate Megatron .bin/.idx datasets (prefixes or directories of shards) into one"


def add_arguments(parser):
    parser.add_argument("--input", nargs="+", required=True,
                        help="dataset prefixes, or directories whose datasets (matching --pattern) are merged "
                             "in sorted name order")
    parser.add_argument("--pattern", default="*.idx", help="glob inside input directories, e.g. '*_text_document.idx'")
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx")


def run(args) -> int:
    from megaocto.data.indexed import merge_datasets, resolve_dataset_inputs

    prefixes = resolve_dataset_inputs(args.input, args.pattern)
    ds = merge_datasets(prefixes, args.output_prefix)
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}: {ds.num_docs} docs, "
          f"{len(ds)} sequences, {ds.num_tokens:,} tokens ({ds.dtype.__name__})")
    return 0
