"""The `eval` section of a run config: in-loop validation loss plus the HumanEvalPack training hook.

    eval:
      interval: 100            # validation loss every 100 steps (and the default HumanEvalPack interval)
      iters: 10
      humanevalpack:
        enabled: true
        tasks: [synthesize]
        languages: [python]
        limit: 20              # first 20 problems per language
        tokenizer: tok.json

Generation runs on every TP rank (identical tokens), execution on rank 0; the loop logs
``eval/<task>/<lang>/pass@<k>`` to the console, metrics.jsonl, TensorBoard and W&B. Importable without torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from megaocto.config.base import ConfigError, field

HEP_TASKS = ("fix-tests", "fix-docs", "explain-synthesize", "synthesize")
HEP_LANGUAGES = ("python", "js", "java", "cpp", "go", "rust")
HEP_TEMPLATES = ("octocoder", "octogeex", "instruct", "continue")


@dataclass
class HumanEvalPackConfig:
    enabled: bool = field(False, "Run HumanEvalPack from inside training (generation on all TP ranks, execution on "
                                 "rank 0) and log eval/<task>/<lang>/pass@k.")
    interval: int | None = field(None, "Every N optimizer steps (also at the end); unset = eval.interval; 0 = only at "
                                       "the end of the run.")
    tasks: list[str] = field(None, "Tasks: fix-tests, fix-docs, synthesize (explain-synthesize needs a "
                                   "descriptions file and is CLI-only).", default_factory=lambda: ["synthesize"])
    languages: list[str] = field(None, "Languages: python, js, java, cpp, go, rust (each needs its toolchain; see "
                                       "launch/setup_toolchains.sh).", default_factory=lambda: ["python"])
    limit: int | None = field(20, "First K problems of each language (164 = all; unset = all).")
    n_samples: int = field(1, "Samples per problem (pass@k is reported for every k in `ks` with k <= n_samples).")
    temperature: float = field(0.2, "Sampling temperature (OctoPack: 0.2; 0 = greedy).")
    top_p: float = field(0.95, "Nucleus sampling p (OctoPack: 0.95).")
    max_new_tokens: int = field(256, "New tokens per sample; with a learned position table, a prompt longer than "
                                     "max_position_embeddings - max_new_tokens keeps its last tokens.")
    template: str = field("octocoder", "Prompt template: octocoder, octogeex, instruct or continue (synthesize only; "
                                       "for base models).")
    ks: list[int] = field(None, "pass@k values to report.", default_factory=lambda: [1, 10, 100])
    seed: int = field(0, "Sampling seed (the same at every evaluation, so runs compare across steps).")
    batch_size: int = field(8, "Prompts generated together.")
    tokenizer: str | None = field(None, "Tokenizer file for prompts; unset = data.tokenizer.")
    data_dir: str | None = field(None, "Directory with <lang>.jsonl HumanEvalPack files; unset = "
                                       "$MEGAOCTO_HUMANEVALPACK or the hub dataset bigcode/humanevalpack.")
    workers: int = field(2, "Programs executed in parallel on rank 0.")
    timeout: float | None = field(None, "Per-program run timeout in seconds; unset = the per-language default "
                                        "(python/js 10, java 30 incl. compiling, go 20, cpp/rust 10 after compiling).")
    output_dir: str | None = field(None, "Where per-step results go (<dir>/iter_<N>/<task>-<lang>.jsonl); unset = "
                                         "<logging.run_dir>/humanevalpack.")

    def validate(self) -> None:
        p = "eval.humanevalpack"
        bad = [t for t in self.tasks if t not in HEP_TASKS]
        if bad:
            raise ConfigError(f"{p}.tasks: unknown {bad}; choose from {', '.join(HEP_TASKS)}")
        if "explain-synthesize" in self.tasks:
            raise ConfigError(f"{p}.tasks: explain-synthesize needs descriptions from explain-describe; run it with "
                              f"`megaocto eval humanevalpack --descriptions FILE` instead")
        bad = [lang for lang in self.languages if lang not in HEP_LANGUAGES]
        if bad:
            raise ConfigError(f"{p}.languages: unknown {bad}; choose from {', '.join(HEP_LANGUAGES)}")
        if self.enabled and (not self.tasks or not self.languages):
            raise ConfigError(f"{p}.tasks and {p}.languages must not be empty when {p}.enabled is true")
        if self.template not in HEP_TEMPLATES:
            raise ConfigError(f"{p}.template must be one of {', '.join(HEP_TEMPLATES)} (got {self.template!r})")
        if self.template == "continue" and any(t != "synthesize" for t in self.tasks):
            raise ConfigError(f"{p}.template continue is only for the synthesize task")
        if self.interval is not None and self.interval < 0:
            raise ConfigError(f"{p}.interval must be >= 0 or unset (got {self.interval})")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{p}.limit must be >= 1 or unset (got {self.limit})")
        if self.n_samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.workers < 1:
            raise ConfigError(f"{p}.n_samples, max_new_tokens, batch_size and workers must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"{p}.temperature must be >= 0 and top_p in (0, 1] (got {self.temperature}, {self.top_p})")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"{p}.ks must be a non-empty list of integers >= 1 (got {self.ks})")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"{p}.timeout must be > 0 or unset (got {self.timeout})")


@dataclass
class EvalConfig:
    interval: int = field(0, "Compute the validation loss every N steps (0 = never; also at the end when > 0).")
    iters: int = field(10, "Validation micro-batch groups averaged per evaluation (each = global batch samples).")
    humanevalpack: HumanEvalPackConfig = field(None, "HumanEvalPack pass@k from inside training (off by default).",
                                               default_factory=HumanEvalPackConfig)

    def validate(self) -> None:
        if self.interval < 0 or self.iters < 0:
            raise ConfigError(f"eval.interval and eval.iters must be >= 0 (got {self.interval}, {self.iters})")
        self.humanevalpack.validate()

    def humanevalpack_interval(self) -> int:
        """Steps between HumanEvalPack runs (0 = only at the end)."""
        hep = self.humanevalpack
        return hep.interval if hep.interval is not None else self.interval
