"""HumanEvalPack evaluation (OctoPack): prompts and post-processing (:mod:`.humanevalpack`), sandboxed execution in
six languages (:mod:`.execute`, :mod:`.toolchains`), pass@k (:mod:`.passk`) and the training hook (:mod:`.hook`).

Imports megaocto.generation (for model samples), never megaocto.training. See docs/eval.md.
"""
