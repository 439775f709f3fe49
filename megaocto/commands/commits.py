"""`megaocto commits`: single-file commits of a local git repo as CommitPack-schema jsonl."""
from __future__ import annotations

NAME = "commits"
HELP = "Extract single-file commits of a local git repository as CommitPack jsonl (counts every skip)"


def add_arguments(parser):
    parser.add_argument("--repo", required=True, help="path of a local git repository")
    parser.add_argument("--output", required=True, help=".jsonl to write")
    parser.add_argument("--rev", default="HEAD", help="history to walk (git log REV; default: %(default)s)")
    parser.add_argument("--max-file-bytes", type=int, default=204_800,
                        help="skip files larger than this many bytes (default: %(default)s)")
    parser.add_argument("--no-renames", dest="renames", action="store_false", help="no rename detection")
    parser.add_argument("--no-additions", dest="additions", action="store_false", help="skip added files")
    parser.add_argument("--license", default=None, help="license id (default: detected from LICENSE/COPYING)")
    parser.add_argument("--repo-name", default=None, help="owner/name (default: from the origin remote)")
    parser.add_argument("--max-rows", type=int, default=None, help="stop after this many rows (newest first)")


def run(args) -> int:
    from megaocto.data.cli_errors import run_cleanly

    return run_cleanly(NAME, _run, args)


def _run(args) -> int:
    from megaocto.data.git_commits import CommitsConfig, extract_commits

    cfg = CommitsConfig(rev=args.rev, max_file_bytes=args.max_file_bytes, renames=args.renames,
                        additions=args.additions, license=args.license, repo_name=args.repo_name,
                        max_rows=args.max_rows)
    ex = extract_commits(args.repo, args.output, cfg)
    print(f"{ex.repo_name} ({ex.license}): {ex.counts['rows']} rows from {ex.counts['commits']} non-merge commits "
          f"-> {args.output}")
    for reason, n in sorted(ex.counts.items()):
        if reason not in ("rows", "commits"):
            print(f"  {reason}: {n}")
    return 0
