"""Data configuration: which samples the trainer sees (importable without torch)."""
from __future__ import annotations

from dataclasses import dataclass

from megaocto.config.base import ConfigError, field

DATA_KINDS = ("synthetic", "gpt", "packed")
PACKED_OVERLONG = ("truncate", "drop", "head")


@dataclass
class DataConfig:
    kind: str = field("synthetic", "Dataset kind: synthetic (generated patterns, no files), gpt (Megatron "
                      "pretraining samples from .bin/.idx prefixes) or packed (inputs/targets pairs packed per row).")
    paths: list[str] = field(default_factory=list, doc="Indexed-dataset prefixes (without .bin/.idx). gpt: token "
                        "prefixes such as data/code_text_document; packed: prefixes P such that "
                        "P_inputs_document and P_targets_document exist. Several paths are blended.")
    weights: list[float] = field(default_factory=list, doc="Blending weight per path (normalised to sum 1). Empty = "
                          "equal weights. Like Megatron's --data-path w1 p1 w2 p2.")
    valid_paths: list[str] = field(default_factory=list, doc="Separate validation datasets (every document, "
                                   "blended with equal weights), like Megatron --valid-data-path. Needs a zero "
                                   "valid share in data.split, e.g. '100,0,0'.")
    test_paths: list[str] = field(default_factory=list, doc="Separate test datasets (every document); needs a zero "
                                  "test share in data.split.")
    split: str = field("969,30,1", "Train/valid/test proportions over DOCUMENTS of every path, e.g. '98,2,0' "
                       "(normalised; Megatron rounding). The three document ranges never overlap.")
    seed: int | None = field(None, "Seed of the data order, FIM and packing shuffles. None = the training seed.")
    tokenizer: str = field("", "Tokenizer file (HF tokenizer.json or sentencepiece .model). Needed for FIM and "
                           "gives eod/pad ids; may be empty when eod_id/pad_id are set and fim_rate == 0.")
    eod_id: int | None = field(None, "End-of-document token id; None = the tokenizer's eod.")
    pad_id: int | None = field(None, "Padding token id for packed rows; None = the tokenizer's pad (else its eod).")
    eod_mask_loss: bool = field(False, "gpt: zero the loss on EOD positions (Megatron --eod-mask-loss).")
    reset_position_ids: bool = field(False, "gpt: restart position ids after every EOD "
                                     "(Megatron --reset-position-ids).")
    fim_rate: float = field(0.0, "gpt: probability that a document segment is turned into a fill-in-the-middle "
                            "example (bigcode --fim-rate). 0 disables FIM and needs no FIM tokens.")
    fim_spm_rate: float = field(0.5, "gpt: probability that a FIM example uses SPM instead of PSM order.")
    fim_tokens: list[str] = field(default_factory=lambda: ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"],
                             doc="FIM special tokens [prefix, middle, suffix, pad] (StarCoder names; SantaCoder "
                             "uses <fim-prefix>, ...).")
    loss_on_inputs: bool = field(False, "packed: also train on the input (prompt) tokens, not only the targets.")
    norm_target_loss: bool = field(False, "packed: scale the loss mask so every example's target weighs the same "
                                   "(Megatron mtf --norm-target-loss).")
    packed_overlong: str = field("truncate", "packed: an example longer than seq_length+1 tokens is 'truncate'd (its "
                                 "input keeps head and tail, its target its start and its end-of-document token) "
                                 "or 'drop'ped (Megatron mtf); 'head' is Magicoder's rule: an example longer than "
                                 "seq_length tokens keeps its first seq_length tokens. Always counted in the "
                                 "dataset summary and log.")
    packing: bool = field(True, "packed: pack several examples per row (segment-isolated attention, positions "
                                "restart per example). false = one example per row, right-padded (Magicoder's "
                                "batching); see docs/data-datasets.md for how the loss normalisation differs.")
    cache_dir: str = field("", "Directory for the index-mapping caches (.npy). Empty = beside each data prefix.")
    num_workers: int = field(2, "DataLoader worker processes per rank.")
    synthetic_vocab_size: int = field(256, "synthetic: token ids are drawn from [0, this); must be <= model vocab.")
    synthetic_epoch_samples: int = field(100_000, "synthetic: samples in one 'epoch' (used when training length "
                                         "is given in epochs).")

    def weights_normalised(self) -> list[float]:
        w = [float(x) for x in self.weights] if self.weights else [1.0] * len(self.paths)
        total = sum(w)
        return [x / total for x in w]

    def split_fractions(self) -> list[float]:
        """The split string as three fractions summing to 1."""
        parts = [p for p in str(self.split).replace("/", ",").split(",") if p.strip() != ""]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"data.split must be comma-separated numbers like '98,2,0' (got {self.split!r})")
        if not 1 <= len(vals) <= 3 or any(v < 0 for v in vals) or sum(vals) <= 0:
            raise ConfigError(f"data.split needs 1 to 3 non-negative numbers with a positive sum (got {self.split!r})")
        vals += [0.0] * (3 - len(vals))
        total = sum(vals)
        return [v / total for v in vals]

    def validate(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"data.kind must be one of {', '.join(DATA_KINDS)} (got {self.kind!r})")
        if self.kind in ("gpt", "packed") and not self.paths:
            raise ConfigError(f"data.kind={self.kind} needs data.paths (indexed-dataset prefixes without .bin/.idx)")
        if self.weights:
            if len(self.weights) != len(self.paths):
                raise ConfigError(f"data.weights has {len(self.weights)} entries but data.paths has "
                                  f"{len(self.paths)}; give one weight per path or none")
            if any(float(w) < 0 for w in self.weights) or sum(float(w) for w in self.weights) <= 0:
                raise ConfigError(f"data.weights must be non-negative with a positive sum (got {self.weights})")
        if len(self.paths) > 255:
            raise ConfigError(f"data.paths: at most 255 datasets can be blended (got {len(self.paths)})")
        fractions = self.split_fractions()
        for key, extra, share in (("valid", self.valid_paths, fractions[1]), ("test", self.test_paths, fractions[2])):
            if extra and share > 0:
                raise ConfigError(f"data.{key}_paths is set, so data.split must give {key} no share of data.paths "
                                  f"(got {self.split!r}; e.g. '100,0,0')")
            leak = sorted(set(extra) & set(self.paths))
            if leak:
                raise ConfigError(f"data.{key}_paths repeats training path(s) {', '.join(leak)}: {key} would see "
                                  f"training documents; use data.split for a held-out range instead")
        if not 0.0 <= self.fim_rate <= 1.0 or not 0.0 <= self.fim_spm_rate <= 1.0:
            raise ConfigError(f"data.fim_rate and data.fim_spm_rate must be in [0, 1] "
                              f"(got {self.fim_rate}, {self.fim_spm_rate})")
        if self.fim_rate > 0 and self.kind != "gpt":
            raise ConfigError("data.fim_rate > 0 only applies to data.kind=gpt; set it to 0")
        if self.fim_rate > 0 and not self.tokenizer:
            raise ConfigError("data.fim_rate > 0 needs data.tokenizer (FIM detokenizes and re-tokenizes documents)")
        if len(self.fim_tokens) != 4:
            raise ConfigError(f"data.fim_tokens must list 4 tokens [prefix, middle, suffix, pad] (got {self.fim_tokens})")
        if (self.kind == "gpt" and (self.eod_mask_loss or self.reset_position_ids)
                and not self.tokenizer and self.eod_id is None):
            raise ConfigError("data.eod_mask_loss / data.reset_position_ids need data.tokenizer or data.eod_id "
                              "to know the EOD token")
        if self.kind == "packed" and not self.tokenizer and self.pad_id is None and self.eod_id is None:
            raise ConfigError("data.kind=packed needs data.tokenizer, data.pad_id or data.eod_id for the padding id")
        if self.packed_overlong not in PACKED_OVERLONG:
            raise ConfigError(f"data.packed_overlong must be one of {', '.join(PACKED_OVERLONG)} "
                              f"(got {self.packed_overlong!r})")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0 (got {self.num_workers})")
        if self.synthetic_vocab_size < 16:
            raise ConfigError(f"data.synthetic_vocab_size must be >= 16 (got {self.synthetic_vocab_size})")
        if self.synthetic_epoch_samples < 1:
            raise ConfigError(f"data.synthetic_epoch_samples must be >= 1 (got {self.synthetic_epoch_samples})")
