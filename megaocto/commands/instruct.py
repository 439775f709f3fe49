"""`megaocto instruct STAGE`: instruction-data generation (OSS-Instruct, Inverse-Instruct) and decontamination.

Each stage reads and writes jsonl; generating stages are resumable and take --shard K/N (docs/instruct.md).
"""
from __future__ import annotations

import json
import sys

NAME = "instruct"
HELP = "Instruction data: oss-instruct, clean, decontaminate, inverse-instruct stages, merge (docs/instruct.md)."


def _teacher_args(p, *, required=True) -> None:
    p.add_argument("--teacher-url", required=required, help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    p.add_argument("--teacher-model", required=required, help="model name sent to the teacher")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    p.add_argument("--max-retries", type=int, default=6, help="retries on 429/5xx/timeouts (default: %(default)s)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in s, doubling (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in s (default: %(default)s)")


def _shard_arg(p) -> None:
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="process only indices with index %% N == K, into OUTPUT.shard-K-of-N (merge with "
                        "`megaocto instruct merge`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)

    p = sub.add_parser("oss-instruct", help="OSS-Instruct: problems + solutions from seed snippets via a teacher")
    p.add_argument("--seeds", nargs="+", required=True,
                   help="seed corpus: .jsonl files (content + language), directories of source files, git repos")
    p.add_argument("--output", required=True, help="output jsonl (resumable: rerun the same command to continue)")
    p.add_argument("--lang", default=None, help="language of every document (default: per row / file extension)")
    p.add_argument("--content-key", default="content", help="jsonl key of the document text (default: %(default)s)")
    p.add_argument("--lang-key", default="lang", help="jsonl key of the language (default: %(default)s)")
    p.add_argument("--quota", action="append", default=[], metavar="LANG=N",
                   help="seeds per language, e.g. --quota python=40000 --quota cpp=5000")
    p.add_argument("--default-quota", type=int, default=None, help="seeds for languages without --quota (all)")
    p.add_argument("--max-considered", type=int, default=150000,
                   help="documents considered per language (Magicoder: %(default)s; 0 = all)")
    p.add_argument("--seed", type=int, default=976, help="Magicoder's seed (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="default: %(default)s")
    p.add_argument("--max-new-tokens", type=int, default=2500, help="default: %(default)s")
    p.add_argument("--teacher-context", type=int, default=8192, help="teacher context length (default: %(default)s)")
    p.add_argument("--count-tokenizer", default=None,
                   help="tokenizer to count prompt tokens for max_tokens (default: tiktoken if installed, else bytes)")
    _teacher_args(p)
    _shard_arg(p)

    p = sub.add_parser("clean", help="Magicoder cleaning: parse, whitespace-insensitive dedup of seed/problem/solution")
    p.add_argument("--inputs", nargs="+", required=True, help="oss-instruct outputs")
    p.add_argument("--output", required=True)
    p.add_argument("--rejected", default=None, help="write rejected rows with their reason here")
    p.add_argument("--shuffle-seed", type=int, default=666, help="default: %(default)s (Magicoder)")

    p = sub.add_parser("merge", help="check that every shard is complete, then write the merged output")
    p.add_argument("--output", required=True, help="the --output the shards were run with")
    p.add_argument("--shards", type=int, required=True, help="N of --shard K/N")

    p = sub.add_parser("decontaminate", help="remove rows containing benchmark strings (exact, lower-cased)")
    p.add_argument("--inputs", nargs="+", required=True, help="jsonl files")
    p.add_argument("--columns", nargs="+", default=["problem", "solution"],
                   help="columns joined by blank lines and searched (default: %(default)s)")
    p.add_argument("--output", required=True, help="kept rows")
    p.add_argument("--removed", default=None, help="removed rows + filter_reason + matched_substring")
    p.add_argument("--humanevalpack", default=None,
                   help="directory of HumanEvalPack <lang>.jsonl (default: $MEGAOCTO_HUMANEVALPACK, else the hub)")
    p.add_argument("--humanevalpack-langs", nargs="+", default=None, help="languages (default: all six)")
    p.add_argument("--humaneval", default=None,
                   help="HumanEval jsonl (prompt, canonical_solution); default: HumanEvalPack's python rows")
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME=FILE:FIELDS",
                   help="more benchmark strings, e.g. mbpp=mbpp_test.jsonl:text,code gsm8k=test.jsonl:question")
    p.add_argument("--report", default=None, help="write the JSON report here too")

    p = sub.add_parser("extract", help="Inverse-Instruct stage 1: the first code block of each response")
    p.add_argument("--inputs", nargs="+", required=True, help="jsonl with instruction/response rows")
    p.add_argument("--output", required=True)
    _shard_arg(p)

    stages = {"summarize": "Inverse-Instruct stage 2: K instructions per code (the model summarizes its code)",
              "score": "Inverse-Instruct stage 3: LM-score p(Yes)/(p(Yes)+p(No)) of every instruction/code pair",
              "inverse-instruct": "Inverse-Instruct, all stages (extract, summarize, score, select); resumable"}
    for name, help_ in stages.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--input" if name != "inverse-instruct" else "--inputs", required=True,
                       nargs=None if name != "inverse-instruct" else "+",
                       help="the previous stage's output" if name != "inverse-instruct" else
                       "jsonl with instruction/response rows (e.g. evol-codealpaca)")
        p.add_argument("--output", required=True)
        p.add_argument("--load", default=None, help="megaocto checkpoint, run in this process (torchrun for tp > 1)")
        p.add_argument("--tokenizer", default=None, help="tokenizer (default: the checkpoint's)")
        p.add_argument("--tp", type=int, default=None)
        p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
        p.add_argument("--batch-size", type=int, default=32, help="rows per decode batch / written chunk")
        _teacher_args(p, required=False)
        p.add_argument("--num-instructions", type=int, default=10, help="K per code (default: %(default)s)")
        p.add_argument("--temperature", type=float, default=0.8, help="default: %(default)s")
        p.add_argument("--top-p", type=float, default=1.0, help="default: %(default)s")
        p.add_argument("--repetition-penalty", type=float, default=1.1, help="default: %(default)s")
        p.add_argument("--max-new-tokens", type=int, default=2048, help="default: %(default)s")
        p.add_argument("--seed", type=int, default=42, help="default: %(default)s")
        p.add_argument("--score-mode", default=None, choices=["native", "compat"],
                       help="native (full-vocabulary logits, needs --load) or compat (InverseCoder's top-5 rule, "
                            "needs --teacher-url); default: native with --load, compat with --teacher-url")
        p.add_argument("--oss-prefix", action="store_true",
                       help="prefix selected instructions with Magicoder's OSS line (InverseCoder's OSS variant)")
        if name == "inverse-instruct":
            p.add_argument("--workdir", default=None, help="intermediate files (default: OUTPUT.work)")
        _shard_arg(p)

    p = sub.add_parser("select", help="Inverse-Instruct stage 4: the best-scored instruction per code")
    p.add_argument("--input", required=True, help="score output")
    p.add_argument("--output", required=True, help="instruction/response jsonl (preprocess --format "
                                                   "instruction-response)")
    p.add_argument("--oss-prefix", action="store_true")
    p.add_argument("--shard", default=None, metavar="K/N")


def _quotas(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        lang, sep, n = item.partition("=")
        if not sep or not lang or not n.isdigit():
            raise ValueError(f"--quota must be LANG=N, e.g. python=40000 (got {item!r})")
        out[lang] = int(n)
    return out


def _teacher_cfg(args):
    from megaocto.instruct.teacher import TeacherConfig

    return TeacherConfig(url=args.teacher_url, model=args.teacher_model, api_key_env=args.api_key_env,
                         timeout_s=args.timeout, max_retries=args.max_retries, backoff_s=args.backoff)


def _print(summary: dict) -> None:
    print(json.dumps(summary, indent=1))
    sys.stdout.flush()


def run(args) -> int:
    from megaocto.instruct.resumable import ResumeError, merge_shards, parse_shard
    from megaocto.instruct.teacher import TeacherError

    try:
        if args.stage == "oss-instruct":
            from megaocto.instruct.oss import OSSConfig, run_oss_instruct

            cfg = OSSConfig(seed=args.seed, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            teacher_context=args.teacher_context, max_considered=args.max_considered or None)
            summary = run_oss_instruct(args.seeds, args.output, _teacher_cfg(args), cfg, lang=args.lang,
                                       content_key=args.content_key, lang_key=args.lang_key,
                                       quotas=_quotas(args.quota), default_quota=args.default_quota,
                                       count_tokenizer=args.count_tokenizer, shard=parse_shard(args.shard),
                                       concurrency=args.concurrency, progress=not args.no_progress)
            _print(summary)
            return 0 if summary["complete"] else 3
        if args.stage == "clean":
            from megaocto.instruct.io import read_jsonl, write_jsonl
            from megaocto.instruct.oss import clean

            rows = []
            for path in args.inputs:
                for row in read_jsonl(path):
                    if "lang" not in row:
                        raise ValueError(f"{path}: rows need a 'lang' field")
                    rows.append(row)
            kept, rejected, counts = clean(rows, shuffle_seed=args.shuffle_seed)
            write_jsonl(args.output, ({"lang": r["lang"], **r} for r in kept))
            if args.rejected:
                write_jsonl(args.rejected, rejected)
            _print(counts)
            return 0
        if args.stage == "merge":
            _print(merge_shards(args.output, args.shards))
            return 0
        if args.stage == "decontaminate":
            from megaocto.instruct.decontaminate import decontaminate_file, load_benchmarks

            benchmarks = load_benchmarks(humanevalpack=args.humanevalpack, humanevalpack_langs=args.humanevalpack_langs,
                                         humaneval=args.humaneval, extra=args.benchmark)
            report = decontaminate_file(args.inputs, args.columns, benchmarks, args.output, args.removed)
            if args.report:
                with open(args.report, "w", encoding="utf-8") as f:
                    json.dump(report, f, indent=1)
            _print(report)
            return 0
        return _run_inverse(args)
    except (ValueError, ResumeError, TeacherError, OSError) as e:  # DataError/BadRowError are ValueErrors
        print(f"megaocto instruct {args.stage}: error: {e}", file=sys.stderr)
        return 2


def _run_inverse(args) -> int:
    from megaocto.instruct import inverse_run as ir
    from megaocto.instruct.inverse import InverseConfig
    from megaocto.instruct.resumable import parse_shard

    shard = parse_shard(args.shard)
    if args.stage == "extract":
        r = ir.run_extract(args.inputs, args.output, shard=shard)
        _print(r)
        return 0
    if args.stage == "select":
        _print(ir.run_select(args.input, args.output, InverseConfig(oss_prefix=args.oss_prefix), shard=shard))
        return 0
    if (args.load is None) == (args.teacher_url is None):
        raise ValueError("give exactly one of --load CKPT (in-process) and --teacher-url URL (an endpoint)")
    if args.teacher_url is not None and not args.teacher_model:
        raise ValueError("--teacher-url needs --teacher-model")
    mode = args.score_mode or ("native" if args.load else "compat")
    if args.stage in ("score", "inverse-instruct"):
        if mode == "native" and args.load is None:
            raise ValueError("--score-mode native computes from the model's own logits: it needs --load")
        if mode == "compat" and args.load is not None:
            raise ValueError("--score-mode compat reproduces InverseCoder through an endpoint: use --teacher-url")
    cfg = InverseConfig(num_instructions=args.num_instructions, temperature=args.temperature, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                        seed=args.seed, score_mode=mode, oss_prefix=args.oss_prefix)
    if args.load:
        backend = ir.LocalBackend(args.load, args.tokenizer, tp=args.tp, dtype=args.dtype,
                                  batch_size=args.batch_size)
    else:
        tok = None
        if args.tokenizer:
            from megaocto.generation import load_tokenizer
            tok = load_tokenizer(args.tokenizer)
        backend = ir.EndpointBackend(_teacher_cfg(args), concurrency=args.concurrency, batch_size=args.batch_size,
                                     compat_tokenizer=tok)
    progress = not args.no_progress
    try:
        if args.stage == "summarize":
            reports = [ir.run_summarize(args.input, args.output, backend, cfg, shard=shard, progress=progress)]
        elif args.stage == "score":
            reports = [ir.run_score(args.input, args.output, backend, cfg, shard=shard, progress=progress)]
        else:
            reports = ir.run_all(args.inputs, args.output, backend, cfg, workdir=args.workdir, shard=shard,
                                 progress=progress)
    finally:
        backend.close()
    if backend.writer:
        _print({"stages": reports})
    return 0 if all(r.get("complete") is not False for r in reports) else 3
