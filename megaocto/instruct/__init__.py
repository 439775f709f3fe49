"""Instruction-data generation (``megaocto instruct``; usage: docs/instruct.md).

* oss.py — OSS-Instruct (Magicoder): seed snippets, the teacher prompt, the parser, cleaning/dedup.
* inverse.py — Inverse-Instruct (InverseCoder): extract, summarize, score (LM-score), select.
* decontaminate.py — exact lower-cased substring decontamination against benchmark strings (Aho-Corasick).
* teacher.py — an OpenAI-compatible client with retries/backoff; runner.py — concurrency, progress, counts;
  resumable.py — append-only output keyed by index, run fingerprint, ``--shard K/N`` and the merge.
"""
