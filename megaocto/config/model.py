"""Model architecture configuration (importable without torch).

Three families share one dataclass:

* ``bigcode`` — GPT-2 style decoder used by SantaCoder / StarCoder(Base): pre-LayerNorm blocks, learned
  absolute positions, tied input/output embeddings, tanh-GELU MLP, multi-query (``num_query_groups=1``),
  grouped or multi-head attention.
* ``glm2`` — ChatGLM2 / CodeGeeX2: RMSNorm, SwiGLU MLP, rotary embedding on part of each head (GLM's
  interleaved pairs), grouped K/V, bias on the QKV projection only, untied output layer.
* ``llama`` — Llama architecture (CodeLlama, DeepSeek-Coder): RMSNorm, SwiGLU MLP, rotary embedding on the whole
  head in GPT-NeoX "halves" style with ``rotary_base`` (rope_theta) and linear ``rope_scaling_factor``, MHA or GQA
  (K/V heads split over TP, replicated when tp > K/V heads), no biases, untied output layer.

``ModelConfig.from_preset("starcoder-15b", seq_length=4096)`` builds a validated config from the data in
:mod:`megaocto.config.presets`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megaocto.config.base import ConfigError, field

FAMILIES = ("bigcode", "glm2", "llama")
ACTIVATIONS = ("gelu_tanh", "gelu", "swiglu")
KERNEL_IMPLS = ("torch", "triton", "auto")  # megaocto.kernels.registry.IMPLS


def pad_vocab(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Vocab rounded up to a multiple of ``multiple * tp`` (Megatron's padded_vocab_size)."""
    step = multiple * tp
    return ((vocab_size + step - 1) // step) * step


# Fields that change the parameters' names or shapes (what a checkpoint must match). seq_length, dropout, epsilon,
# init and rotary settings do not; positions count through the bigcode position table's rows (max_positions).
WEIGHT_FIELDS = ("family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                 "ffn_hidden_size", "vocab_size", "make_vocab_size_divisible_by", "activation", "add_qkv_bias",
                 "add_bias_linear", "tie_embeddings")


def weight_shape_differences(saved: dict, configured: dict) -> list[str]:
    """`model.<field>=<saved> (configured: <now>)` for each field of two ModelConfig dicts that changes the weights;
    for bigcode also the rows of the learned position table (max_position_embeddings, or seq_length when unset)."""
    diff = [f"model.{k}={saved[k]!r} (configured: {configured[k]!r})" for k in WEIGHT_FIELDS
            if k in saved and k in configured and saved[k] != configured[k]]
    if saved.get("family") == configured.get("family") == "bigcode":
        def rows(d):
            return d.get("max_position_embeddings") or d.get("seq_length")

        if rows(saved) != rows(configured):
            src = "" if configured.get("max_position_embeddings") else ", from model.seq_length"
            diff.append(f"position table rows {rows(saved)!r} (configured: {rows(configured)!r}{src}; set "
                        f"model.max_position_embeddings={rows(saved)!r})")
    return diff


# LoRA target names per family (megaocto's own terms) -> (host module under the block, first block, end block,
# shared-A group). Blocks index the fused output blocks of a column-parallel host ([q|k|v], [k|v], [gate|up]);
# None = the whole output. Targets with the same group share one A (bigcode multi-query query_key_value: HF's single
# c_attn adapter spans megaocto's column-parallel query and replicated key_value).
LORA_TARGETS = {
    "bigcode": {"query_key_value": None,  # resolved per attention type in lora_target_specs
                "query": ("self_attention.query", None, None, None),
                "key_value": ("self_attention.key_value", None, None, None),
                "dense": ("self_attention.dense", None, None, None),
                "fc1": ("mlp.dense_h_to_4h", None, None, None),
                "fc2": ("mlp.dense_4h_to_h", None, None, None)},
    "glm2": {"query_key_value": ("self_attention.query_key_value", None, None, None),
             "q": ("self_attention.query_key_value", 0, 1, None),
             "k": ("self_attention.query_key_value", 1, 2, None),
             "v": ("self_attention.query_key_value", 2, 3, None),
             "dense": ("self_attention.dense", None, None, None),
             "up": ("mlp.dense_h_to_4h", None, None, None),
             "down": ("mlp.dense_4h_to_h", None, None, None)},
    "llama": {"q": ("self_attention.query", None, None, None),
              "k": ("self_attention.key_value", 0, 1, None),
              "v": ("self_attention.key_value", 1, 2, None),
              "o": ("self_attention.dense", None, None, None),
              "gate": ("mlp.dense_h_to_4h", 0, 1, None),
              "up": ("mlp.dense_h_to_4h", 1, 2, None),
              "down": ("mlp.dense_4h_to_h", None, None, None)},
}
# Accepted aliases (HF module names and megaocto module names) -> megaocto target names.
LORA_ALIASES = {
    "bigcode": {"c_attn": ["query_key_value"], "q_attn": [], "c_proj": ["dense", "fc2"], "c_fc": ["fc1"],
                "dense_h_to_4h": ["fc1"], "dense_4h_to_h": ["fc2"], "mlp.c_proj": ["fc2"], "attn.c_proj": ["dense"]},
    "glm2": {"dense_h_to_4h": ["up"], "dense_4h_to_h": ["down"], "q_proj": ["q"], "k_proj": ["k"], "v_proj": ["v"],
             "o_proj": ["dense"], "gate_up_proj": ["up"], "down_proj": ["down"]},
    "llama": {"q_proj": ["q"], "k_proj": ["k"], "v_proj": ["v"], "o_proj": ["o"], "gate_proj": ["gate"],
              "up_proj": ["up"], "down_proj": ["down"], "query": ["q"], "key_value": ["k", "v"], "dense": ["o"],
              "dense_h_to_4h": ["gate", "up"], "dense_4h_to_h": ["down"]},
}
LORA_INITS = ("peft", "gaussian")


@dataclass
class LoraConfig:
    rank: int = field(0, "LoRA rank r; 0 = LoRA off (full finetuning). With r > 0 every base weight is frozen "
                         "(no grads, no fp32 masters, no optimizer state) and only the adapters train.")
    alpha: float = field(16.0, "LoRA alpha: the adapter output is scaled by alpha / rank (PEFT lora_alpha).")
    dropout: float = field(0.0, "Dropout on the adapter input (PEFT lora_dropout).")
    target_modules: list = field(
        default_factory=lambda: ["query_key_value", "dense"],
        doc="Layers that get adapters, in megaocto's names per family — bigcode: query_key_value (HF c_attn), query, "
            "key_value, dense, fc1, fc2; glm2: query_key_value (one A, ChatGLM2's adapter) or q, k, v "
            "(one A each, transformers Glm's q_proj/k_proj/v_proj), dense, up, down; llama: q, k, v, o, gate, up, "
            "down — or HF names (c_attn, q_attn, c_proj, c_fc, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
            "down_proj, gate_up_proj), which map to the same adapters PEFT would create.")
    init: str = field("peft", "Adapter init: peft (PEFT's default: A Kaiming-uniform a=sqrt(5), B zero) or gaussian "
                              "(A ~ N(0, 1/r²), B zero); both leave the step-0 model equal to the base.")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self, family: str = "bigcode", mqa: bool = True) -> None:
        if self.rank < 0:
            raise ConfigError(f"model.lora.rank must be >= 0 (got {self.rank})")
        if not self.enabled:
            return
        if self.alpha <= 0:
            raise ConfigError(f"model.lora.alpha must be > 0 (got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1) (got {self.dropout})")
        if self.init not in LORA_INITS:
            raise ConfigError(f"model.lora.init must be one of {LORA_INITS} (got {self.init!r})")
        lora_target_specs(self, family, mqa)


def lora_target_names(lora: LoraConfig, family: str) -> list[str]:
    """The megaocto target names of ``lora.target_modules`` (aliases resolved, order kept, no duplicates)."""
    if isinstance(lora.target_modules, str) or not lora.target_modules:
        raise ConfigError(f"model.lora.target_modules must be a non-empty list (got {lora.target_modules!r})")
    own, aliases = LORA_TARGETS[family], LORA_ALIASES[family]
    names: list[str] = []
    for t in lora.target_modules:
        if t in own:
            resolved = [t]
        elif t in aliases:
            resolved = aliases[t]
        else:
            raise ConfigError(f"model.lora.target_modules: {t!r} is not a {family} layer; use one of "
                              f"{', '.join(own)} (or the HF names {', '.join(aliases)})")
        names += [n for n in resolved if n not in names]
    if not names:
        raise ConfigError(f"model.lora.target_modules {lora.target_modules} match no {family} layer "
                          f"(q_attn exists only in HF cross-attention)")
    return names


def lora_target_specs(lora: LoraConfig, family: str, mqa: bool) -> dict[str, tuple[str, int | None, int | None,
                                                                                   str | None]]:
    """{target name: (host path under a block, first block, end block, shared-A group)} for the configured targets."""
    specs = {}
    for name in lora_target_names(lora, family):
        spec = LORA_TARGETS[family][name]
        if family == "bigcode" and name == "query_key_value":
            spec = ("self_attention.query_key_value", None, None, None)
            if mqa:  # HF's c_attn [q | kv] is megaocto's column-parallel query + replicated key_value
                specs["query_key_value.q"] = ("self_attention.query", None, None, "query_key_value")
                specs["query_key_value.kv"] = ("self_attention.key_value", None, None, "query_key_value")
                continue
        elif family == "bigcode" and name in ("query", "key_value") and not mqa:
            raise ConfigError(f"model.lora.target_modules: {name!r} exists only with multi-query attention "
                              f"(num_query_groups=1); this model has the fused query_key_value (HF c_attn)")
        specs[name] = spec
    if family == "bigcode" and mqa and "query_key_value.q" in specs and ("query" in specs or "key_value" in specs):
        raise ConfigError("model.lora.target_modules: query_key_value (c_attn) already covers query and key_value; "
                          "list either query_key_value or query/key_value")
    return specs


@dataclass
class ModelConfig:
    family: str = field("bigcode", "Model family: bigcode (GPT/StarCoder, MQA/MHA), glm2 (ChatGLM2/CodeGeeX2) or "
                                   "llama (CodeLlama, DeepSeek-Coder).")
    num_layers: int = field(2, "Number of transformer blocks (Megatron --num-layers).")
    hidden_size: int = field(64, "Width of the residual stream h (Megatron --hidden-size).")
    num_attention_heads: int = field(4, "Number of query heads; must be divisible by the tensor-parallel size.")
    num_query_groups: int = field(
        1, "Number of K/V heads: 1 = multi-query (StarCoder), == num_attention_heads = multi-head, "
           "otherwise grouped (CodeGeeX2 uses 2). With >1 group, groups must be divisible by tp (llama: or tp "
           "divisible by groups, which replicates the K/V projection on every TP rank).")
    kv_channels: int | None = field(None, "Per-head dimension; None means hidden_size // num_attention_heads.")
    ffn_hidden_size: int | None = field(
        None, "MLP inner width; None means 4*hidden_size. For swiglu this is the width of each of gate/up.")
    vocab_size: int = field(1000, "Tokenizer vocabulary size (before padding for tensor parallelism).")
    make_vocab_size_divisible_by: int = field(
        128, "Embedding rows are padded to a multiple of this times tp (Megatron --make-vocab-size-divisible-by).")
    seq_length: int = field(64, "Training sequence length (tokens per sample).")
    max_position_embeddings: int | None = field(
        None, "Rows of the learned position table (bigcode; seq_length must not exceed it); informational for glm2 "
              "(rotary positions have no table). None means seq_length.")
    activation: str = field(
        "gelu_tanh", "MLP activation: gelu_tanh (Megatron's fused bias-GELU, HF gelu_pytorch_tanh), gelu (exact erf) "
                     "or swiglu (glm2, llama: silu(gate) * up).")
    norm_epsilon: float = field(1e-5, "Epsilon of LayerNorm (bigcode) / RMSNorm (glm2, llama).")
    init_method_std: float = field(
        0.02, "Std of the normal init of weights; output projections (attention dense, MLP down) use "
              "std / sqrt(2 * num_layers) (Megatron --init-method-std).")
    attention_dropout: float = field(0.1, "Dropout on attention probabilities (Megatron --attention-dropout).")
    hidden_dropout: float = field(0.1, "Dropout on embeddings and on each residual branch (Megatron --hidden-dropout).")
    add_qkv_bias: bool = field(True, "Bias on the query/key/value projections.")
    add_bias_linear: bool = field(
        True, "Bias on the attention output and MLP projections (bigcode: true; glm2: false).")
    tie_embeddings: bool = field(
        True, "Use the input word embedding as the output layer (bigcode); false adds an untied output_layer (glm2).")
    rotary_percent: float = field(
        0.5, "glm2: fraction of each head's dims that get rotary position embedding (CodeGeeX2: 0.5); llama rotates "
             "the whole head (must be 1.0).")
    rotary_base: float = field(10000.0, "glm2, llama: rotary frequency base theta (HF rope_theta).")
    rope_scaling_factor: float = field(
        1.0, "llama: linear RoPE scaling (HF rope_scaling {type: linear, factor}): rotary angles use position / "
             "factor. 1.0 = no scaling (DeepSeek-Coder uses 4.0).")
    lora: LoraConfig = field(default_factory=LoraConfig,
                             doc="LoRA adapters (parameter-efficient finetuning); off unless lora.rank > 0.")
    kernels: str = field(
        "auto", "Fused-kernel implementation (megaocto.kernels): torch (plain torch, apex norms when installed), "
                "triton (fused Triton kernels; on CPU only under TRITON_INTERPRET=1) or auto (triton on CUDA when "
                "triton imports, else torch). Numerics only; the weights do not depend on it.")

    def __post_init__(self):
        if isinstance(self.lora, dict):  # from checkpoint metadata / to_dict()
            self.lora = LoraConfig(**self.lora)
        elif self.lora is None:
            self.lora = LoraConfig()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings if self.max_position_embeddings is not None else self.seq_length

    @property
    def is_mqa(self) -> bool:
        return self.num_query_groups == 1

    @property
    def rotary_dim(self) -> int:
        """Number of rotated dims per head (glm2, llama); 0 for bigcode."""
        return int(self.head_dim * self.rotary_percent) if self.family in ("glm2", "llama") else 0

    def kv_split_over(self, tp: int) -> bool:
        """Whether the K/V heads are split over ``tp`` ranks (False: every rank holds all of them — bigcode MQA,
        or llama with tp > num_query_groups)."""
        if self.family == "bigcode" and self.is_mqa:
            return False
        return self.num_query_groups % tp == 0

    def padded_vocab_size(self, tp: int = 1) -> int:
        return pad_vocab(self.vocab_size, tp, self.make_vocab_size_divisible_by)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """A preset from :mod:`megaocto.config.presets`, with field overrides, validated for tp=1."""
        from megaocto.config.presets import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        values = dict(PRESETS[name])
        values.pop("source", None)
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ConfigError(f"unknown ModelConfig field(s) {bad} in overrides for preset {name!r}; "
                              f"valid fields: {', '.join(sorted(known))}")
        values.update(overrides)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation
    def validate(self, tp: int = 1, *, sequence_parallel: bool = False) -> None:
        """Raise ConfigError when the architecture is inconsistent or cannot be split over ``tp`` ranks.

        ``sequence_parallel`` (only meaningful with tp > 1) also requires ``seq_length`` to split evenly over tp.
        """
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family must be one of {FAMILIES} (got {self.family!r})")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "vocab_size",
                     "seq_length", "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1 (got {getattr(self, name)})")
        if self.kernels not in KERNEL_IMPLS:
            raise ConfigError(f"model.kernels must be one of {KERNEL_IMPLS} (got {self.kernels!r})")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation must be one of {ACTIVATIONS} (got {self.activation!r})")
        if self.family in ("glm2", "llama") and self.activation != "swiglu":
            raise ConfigError(f"model.activation must be 'swiglu' for family {self.family} (got {self.activation!r})")
        if self.family == "bigcode" and self.activation == "swiglu":
            raise ConfigError("model.activation 'swiglu' is only supported by families glm2 and llama; use gelu_tanh "
                              "for bigcode")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; change one of them or set model.kv_channels explicitly")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} must be a multiple of num_query_groups="
                f"{self.num_query_groups} (each K/V group serves the same number of query heads)")
        if tp < 1:
            raise ConfigError(f"tensor-parallel size must be >= 1 (got {tp})")
        if self.num_attention_heads % tp:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by tp={tp}; "
                f"pick a tensor-parallel size that divides the head count")
        if self.family == "llama":
            if self.num_query_groups % tp and tp % self.num_query_groups:
                raise ConfigError(
                    f"model.num_query_groups={self.num_query_groups} and tp={tp}: llama splits the K/V heads over TP "
                    f"when tp divides them, or replicates them on every rank when they divide tp; use a tp that "
                    f"divides or is a multiple of {self.num_query_groups}")
        elif self.num_query_groups > 1 and self.num_query_groups % tp:
            raise ConfigError(
                f"model.num_query_groups={self.num_query_groups} is not divisible by tp={tp}: every TP rank must own "
                f"whole K/V groups. Use tp in the divisors of {self.num_query_groups}, or multi-query "
                f"(num_query_groups=1, bigcode only) which replicates K/V on every rank")
        if self.family == "glm2" and self.num_query_groups == 1 and tp > 1:
            raise ConfigError("glm2 shards K/V groups over TP; num_query_groups=1 only works with tp=1 "
                              "(use family bigcode for replicated multi-query K/V)")
        if self.ffn_size % tp:
            raise ConfigError(f"MLP width {self.ffn_size} (model.ffn_hidden_size) is not divisible by tp={tp}")
        if sequence_parallel and tp > 1 and self.seq_length % tp:
            raise ConfigError(
                f"model.seq_length={self.seq_length} is not divisible by tp={tp}, which "
                f"parallel.sequence_parallel=true requires (each TP rank holds seq_length/tp tokens); use a "
                f"seq_length that is a multiple of {tp} or set parallel.sequence_parallel=false")
        # Only a learned absolute position table (bigcode) bounds the sequence length; glm2's rotary embedding
        # is computed for any length, so max_position_embeddings is informational there.
        if self.family == "bigcode" and self.max_positions < self.seq_length:
            raise ConfigError(
                f"model.seq_length={self.seq_length} exceeds max_position_embeddings={self.max_positions}; "
                f"raise max_position_embeddings or shorten seq_length")
        for name in ("attention_dropout", "hidden_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1) (got {p})")
        if self.init_method_std <= 0:
            raise ConfigError(f"model.init_method_std must be > 0 (got {self.init_method_std})")
        if self.family == "glm2":
            if self.tie_embeddings:
                raise ConfigError("glm2 has an untied output layer; set model.tie_embeddings=false")
            if not 0.0 < self.rotary_percent <= 1.0 or self.rotary_dim % 2:
                raise ConfigError(
                    f"model.rotary_percent={self.rotary_percent} must give an even, non-zero number of rotated dims "
                    f"per head (head_dim={self.head_dim} -> {self.rotary_dim})")
        if self.family == "llama":
            for name in ("tie_embeddings", "add_qkv_bias", "add_bias_linear"):
                if getattr(self, name):
                    raise ConfigError(f"llama has no biases and an untied output layer; set model.{name}=false")
            if self.rotary_percent != 1.0:
                raise ConfigError(f"llama rotates the whole head; set model.rotary_percent=1.0 "
                                  f"(got {self.rotary_percent})")
            if self.head_dim % 2:
                raise ConfigError(f"llama rotary needs an even head dim (got {self.head_dim})")
            if self.rope_scaling_factor < 1.0:
                raise ConfigError(f"model.rope_scaling_factor must be >= 1 (got {self.rope_scaling_factor})")
            if self.rotary_base <= 0:
                raise ConfigError(f"model.rotary_base must be > 0 (got {self.rotary_base})")
        self.lora.validate(self.family, self.is_mqa)
