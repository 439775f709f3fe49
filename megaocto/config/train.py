"""Training-run configuration: one dataclass per section of a `megaocto train` config file.

A run config file has the sections of :class:`RunConfig`::

    model:      {preset: tiny-bigcode, ...}     # ModelConfig (preset applied first; seq_length lives here)
    parallel:   {tp: 2}                          # ParallelConfig
    data:       {kind: synthetic, ...}           # DataConfig
    optimizer / schedule / checkpoint / logging / eval / train   (below)
"""
from __future__ import annotations

from dataclasses import dataclass

from megaocto.config.base import ConfigError, field
from megaocto.config.data import DataConfig
from megaocto.config.eval import EvalConfig  # noqa: F401  (the `eval` section; importable from here too)
from megaocto.config.model import ModelConfig
from megaocto.config.parallel import ParallelConfig

LR_STYLES = ("constant", "linear", "cosine", "inverse_sqrt")
OPTIMIZERS = ("adamw", "adafactor")
ADAFACTOR_MIN_EPS1 = 1e-19  # eps1**2 must stay a normal fp32 number (torch clamps the variance at eps1**2)


@dataclass
class OptimizerConfig:
    name: str = field("adamw", "adamw (torch.optim.AdamW) or adafactor (torch.optim.Adafactor, as Magicoder and "
                               "InverseCoder train; see docs/training.md). Both run on the fp32 master weights.")
    lr: float = field(1e-4, "Peak learning rate (Megatron --lr).")
    weight_decay: float = field(0.01, "AdamW decoupled weight decay; never applied to biases and norm weights (1-D params).")
    beta1: float = field(0.9, "Adam beta1.")
    beta2: float = field(0.999, "Adam beta2 (0.95 is common for large code models).")
    eps: float = field(1e-8, "Adam epsilon.")
    clip_grad: float = field(1.0, "Global L2 grad-norm clipping threshold over all ranks; 0 disables clipping.")
    fused: str = field("auto", "torch AdamW implementation: auto (fused on CUDA and CPU), fused, foreach or single (per-tensor loop).")
    adafactor_scale_parameter: bool = field(True, "adafactor: true = torch's step, lr x max(eps2, RMS(param)) x "
                                                  "update (relative step size); false = the step is lr x update, as "
                                                  "HF transformers' Adafactor(scale_parameter=False, "
                                                  "relative_step=False) that Magicoder's Trainer used.")
    adafactor_beta2_decay: float = field(-0.8, "adafactor: second-moment decay, beta2_t = 1 - t^beta2_decay (<= 0).")
    adafactor_eps1: float | None = field(None, "adafactor: floor of the second-moment estimate (torch's eps[0]); "
                                               "None = the fp32 machine epsilon (torch's default). HF uses 1e-30 "
                                               "added to grad^2; 1e-15 is the closest torch equivalent (eps1^2 must "
                                               "be a normal fp32 number, so >= 1e-19).")
    adafactor_eps2: float = field(1e-3, "adafactor: floor of RMS(param) in the relative step size (torch's eps[1]).")
    adafactor_d: float = field(1.0, "adafactor: update clipping threshold: the update's RMS is clipped to d (>= 1).")

    def validate(self) -> None:
        if self.lr < 0 or self.weight_decay < 0 or self.clip_grad < 0 or self.eps <= 0:
            raise ConfigError("optimizer.lr, weight_decay and clip_grad must be >= 0 and eps > 0 "
                              f"(got lr={self.lr}, weight_decay={self.weight_decay}, clip_grad={self.clip_grad}, eps={self.eps})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"optimizer.beta1/beta2 must be in [0, 1) (got {self.beta1}, {self.beta2})")
        if self.fused not in ("auto", "fused", "foreach", "single"):
            raise ConfigError(f"optimizer.fused must be auto, fused, foreach or single (got {self.fused!r})")
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)} (got {self.name!r})")
        if self.adafactor_beta2_decay > 0 or self.adafactor_d < 1 or self.adafactor_eps2 < 0:
            raise ConfigError(f"optimizer.adafactor_beta2_decay must be <= 0, adafactor_d >= 1 and adafactor_eps2 >= 0 "
                              f"(got {self.adafactor_beta2_decay}, {self.adafactor_d}, {self.adafactor_eps2})")
        if self.adafactor_eps1 is not None and not ADAFACTOR_MIN_EPS1 <= self.adafactor_eps1:
            raise ConfigError(f"optimizer.adafactor_eps1={self.adafactor_eps1} is below {ADAFACTOR_MIN_EPS1:g}: torch "
                              f"clamps the variance at eps1^2, which would round to 0 in fp32 and make the update of "
                              f"a zero gradient NaN; use 1e-15 (closest to HF's 1e-30) or leave it unset")


@dataclass
class ScheduleConfig:
    style: str = field("cosine", "LR decay style: constant, linear, cosine or inverse_sqrt (Megatron --lr-decay-style).")
    min_lr: float = field(0.0, "LR floor reached at the end of the decay and kept after it (Megatron --min-lr).")
    warmup_iters: int = field(0, "Linear warmup length in optimizer steps; the first step uses lr*1/warmup, never 0.")
    warmup_fraction: float = field(0.0, "Warmup as a fraction of the decay steps (used when warmup_iters is 0).")
    decay_iters: int | None = field(None, "Steps over which the LR decays to min_lr; default: the run's total steps.")

    def validate(self) -> None:
        if self.style not in LR_STYLES:
            raise ConfigError(f"schedule.style must be one of {', '.join(LR_STYLES)} (got {self.style!r})")
        if self.warmup_iters < 0 or not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"schedule.warmup_iters must be >= 0 and warmup_fraction in [0, 1) "
                              f"(got {self.warmup_iters}, {self.warmup_fraction})")
        if self.decay_iters is not None and self.decay_iters < 1:
            raise ConfigError(f"schedule.decay_iters must be >= 1 or unset (got {self.decay_iters})")
        if self.min_lr < 0:
            raise ConfigError(f"schedule.min_lr must be >= 0 (got {self.min_lr})")


@dataclass
class CheckpointConfig:
    save: str | None = field(None, "Directory to save checkpoints into (Megatron layout); unset = never save.")
    load: str | None = field(None, "Directory to resume/finetune from; its latest_checkpointed_iteration.txt picks the step.")
    save_interval: int = field(0, "Save every N steps (0 = only at the end, on preemption and on divergence).")
    keep_last: int = field(0, "Keep only the newest N iter_* checkpoints in `save` (0 = keep all).")
    finetune: bool = field(False, "Load model weights only; start at iteration 0 with fresh optimizer, RNG and data position.")
    no_load_optim: bool = field(False, "Do not load optimizer state (fp32 masters come from the loaded model weights); "
                                       "also lets a run resume a checkpoint saved with save_optim=false.")
    no_load_rng: bool = field(False, "Do not load RNG states; re-seed from train.seed instead.")
    reset_progress: bool = field(False, "Load model+optimizer but reset iteration, consumed samples and the LR schedule to 0.")
    auto_resume: bool = field(True, "When `save` already holds a checkpoint (a requeued job), resume from it with full "
                                    "state and ignore load/finetune/reset_progress/no_load_rng; no_load_optim only "
                                    "matters there for a checkpoint saved without optimizer state (save_optim=false).")
    save_optim: bool = field(True, "Save optimizer state (AdamW moments and fp32 masters); needed for exact resume.")
    override_scheduler: bool = field(False, "On resume, use the configured LR schedule even if it differs from the "
                                            "checkpoint's (Megatron --override-opt_param-scheduler); by default a "
                                            "difference is an error.")
    use_checkpoint_scheduler: bool = field(False, "On resume, take the LR schedule (lr, min_lr, style, warmup, decay "
                                                  "steps) from the checkpoint instead of the config (Megatron "
                                                  "--use-checkpoint-opt_param-scheduler).")
    use_checkpoint_args: bool = field(True, "Take the model architecture (every model.* field except seq_length, "
                                            "dropout, init and kernels) from the loaded checkpoint's metadata.json, "
                                            "so finetuning a converted checkpoint needs no model fields; model keys "
                                            "set in the config file or on the command line still win, a "
                                            "model.preset does not (Megatron --use-checkpoint-args).")

    def validate(self) -> None:
        if self.save_interval < 0 or self.keep_last < 0:
            raise ConfigError(f"checkpoint.save_interval and keep_last must be >= 0 "
                              f"(got {self.save_interval}, {self.keep_last})")
        if self.override_scheduler and self.use_checkpoint_scheduler:
            raise ConfigError("set at most one of checkpoint.override_scheduler and checkpoint.use_checkpoint_scheduler")


@dataclass
class LoggingConfig:
    run_dir: str = field("runs/megaocto", "Directory for metrics.jsonl, TensorBoard events and W&B files.")
    log_interval: int = field(10, "Log loss/lr/grad-norm/throughput every N steps.")
    jsonl: bool = field(True, "Write one JSON object per logged step to {run_dir}/metrics.jsonl.")
    tensorboard: bool = field(False, "Write TensorBoard scalars to {run_dir}/tensorboard.")
    wandb: bool = field(False, "Log to Weights & Biases (WANDB_MODE=offline works without login).")
    wandb_project: str | None = field(None, "W&B project; unset: $WANDB_PROJECT, else 'megaocto' (a set value wins "
                                            "over the environment, as wandb.init(project=...) does).")
    wandb_run_name: str | None = field(None, "W&B run name; unset: $WANDB_NAME, else W&B picks one.")
    wandb_group: str | None = field(None, "W&B group; unset: $WANDB_RUN_GROUP.")
    wandb_entity: str | None = field(None, "W&B entity (team or user); unset: $WANDB_ENTITY, else the logged-in user.")
    wandb_id: str | None = field(None, "W&B run id (opened with resume='allow'); unset: $WANDB_RUN_ID, else under SLURM "
                                       "slurm-[<cluster>-]<SLURM_JOB_ID>-<run dir hash>, the same for every requeued "
                                       "part of the job, so they continue one W&B run; else a new id.")
    peak_tflops: float | None = field(None, "Peak dense TFLOP/s per device for MFU; default: looked up by GPU name (n/a on CPU).")

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ConfigError(f"logging.log_interval must be >= 1 (got {self.log_interval})")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"logging.peak_tflops must be > 0 or unset (got {self.peak_tflops})")


@dataclass
class TrainConfig:
    micro_batch_size: int = field(1, "Samples per forward/backward on one DP rank (Megatron --micro-batch-size).")
    global_batch_size: int | None = field(None, "Samples per optimizer step over all DP ranks; default micro_batch_size*dp.")
    iters: int | None = field(None, "Run length in optimizer steps (set exactly one of iters, samples, epochs).")
    samples: int | None = field(None, "Run length in samples; steps = ceil(samples / global_batch_size).")
    epochs: float | None = field(None, "Run length in passes over the training split (needs the data layer's epoch size).")
    seed: int = field(1234, "Seed for model init, dropout and data order.")
    dtype: str = field("bf16", "Compute dtype: bf16 (fp32 master weights + fp32 grads, Megatron style) or fp32.")
    recompute: str = field("none", "Activation recompute: none, full (every recompute_num_layers layers) or selective (attention).")
    recompute_num_layers: int = field(1, "With recompute=full: layers per recomputed chunk.")
    loss_reduction: str = field(
        "token_mean", "token_mean: every loss-masked token of the global batch weighs the same, across micro batches "
                      "and DP ranks (torchtitan; Megatron-Core calculate_per_token_loss); micro_batch_mean: mean per "
                      "micro batch, then averaged (classic Megatron; biased for SFT with variable target lengths).")
    overlap_grad_reduce: bool = field(True, "Start each grad bucket's DP all-reduce during the last micro batch's "
                                      "backward (Megatron --overlap-grad-reduce); false = all-reduce after backward.")
    grad_bucket_mb: float = field(25.0, "Size of the fp32 grad buckets for the DP all-reduce, in MB.")
    zero1: bool = field(False, "Distributed optimizer (ZeRO-1, Megatron --use-distributed-optimizer): fp32 masters "
                               "and AdamW state sharded over the DP group, grads reduce-scattered, updated params "
                               "all-gathered; optimizer memory / dp. Checkpoints keep the unsharded layout, so a "
                               "run resumes at any DP size, with or without zero1.")
    max_skipped_steps: int = field(10, "Skip up to N steps with NaN/inf loss or grad norm; one more saves the last good state and stops.")
    exit_interval: int | None = field(None, "Save and exit cleanly after the step whose number is a multiple of N.")
    exit_duration_mins: float | None = field(None, "Save and exit cleanly once the run has used this many minutes.")
    debug_nan_iters: list[int] = field(None, "Testing hook: make the loss NaN at these (1-based) steps.", default_factory=list)
    compile: bool = field(False, "torch.compile the model (first step compiles; CPU works via inductor).")

    def validate(self) -> None:
        if self.micro_batch_size < 1:
            raise ConfigError(f"train.micro_batch_size must be >= 1 (got {self.micro_batch_size})")
        if self.global_batch_size is not None and self.global_batch_size < self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is smaller than "
                              f"micro_batch_size={self.micro_batch_size}")
        lengths = [n for n in ("iters", "samples", "epochs") if getattr(self, n) is not None]
        if len(lengths) != 1:
            raise ConfigError("set exactly one of train.iters, train.samples, train.epochs "
                              f"(got {', '.join(lengths) or 'none'})")
        if getattr(self, lengths[0]) <= 0:
            raise ConfigError(f"train.{lengths[0]} must be > 0 (got {getattr(self, lengths[0])})")
        if self.dtype not in ("bf16", "fp32"):
            raise ConfigError(f"train.dtype must be bf16 or fp32 (got {self.dtype!r})")
        if self.recompute not in ("none", "full", "selective"):
            raise ConfigError(f"train.recompute must be none, full or selective (got {self.recompute!r})")
        if self.loss_reduction not in ("token_mean", "micro_batch_mean"):
            raise ConfigError(f"train.loss_reduction must be token_mean or micro_batch_mean (got {self.loss_reduction!r})")
        if self.grad_bucket_mb <= 0:
            raise ConfigError(f"train.grad_bucket_mb must be > 0 (got {self.grad_bucket_mb})")
        if self.max_skipped_steps < 0:
            raise ConfigError(f"train.max_skipped_steps must be >= 0 (got {self.max_skipped_steps})")

    def microbatches(self, dp: int) -> int:
        """Micro batches per optimizer step on each DP rank (global batch / (micro batch x dp))."""
        gbs = self.global_batch_size or self.micro_batch_size * dp
        if gbs % (self.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size={gbs} is not divisible by micro_batch_size*dp = "
                f"{self.micro_batch_size}*{dp}; pick a global batch that is a multiple of {self.micro_batch_size * dp}")
        return gbs // (self.micro_batch_size * dp)


@dataclass
class RunConfig:
    model: ModelConfig = field(None, "Model architecture (`preset` picks a named one; other keys override it).",
                               default_factory=ModelConfig)
    parallel: ParallelConfig = field(None, "Parallel layout (tp, pp, sequence parallel, backend).", default_factory=ParallelConfig)
    data: DataConfig = field(None, "Training/validation data.", default_factory=DataConfig)
    optimizer: OptimizerConfig = field(None, "AdamW and gradient clipping.", default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(None, "Learning-rate schedule.", default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(None, "Saving, resuming and finetune-loading.", default_factory=CheckpointConfig)
    logging: LoggingConfig = field(None, "Metrics sinks and intervals.", default_factory=LoggingConfig)
    eval: EvalConfig = field(None, "In-loop validation loss and the HumanEvalPack hook.", default_factory=EvalConfig)
    train: TrainConfig = field(None, "Batch sizes, run length, precision, seed.", default_factory=TrainConfig)

    def validate(self) -> None:
        for name in ("optimizer", "schedule", "checkpoint", "logging", "eval", "train"):
            getattr(self, name).validate()
        if self.optimizer.name == "adafactor" and self.train.zero1:
            raise ConfigError("train.zero1 does not support optimizer.name=adafactor (its factored second moment and "
                              "RMS-based step are per whole tensor, not elementwise); set train.zero1=false")
        if self.optimizer.name == "adafactor" and self.parallel.tp > 1:
            raise ConfigError("optimizer.name=adafactor needs parallel.tp=1 (its factored second moment and RMS-based "
                              "step are per whole tensor, and tp>1 would give each rank a shard); use tp=1 with "
                              "train.recompute=full, or optimizer.name=adamw")
        self.parallel.validate()
        self.model.validate(tp=self.parallel.tp)
        self.data.validate()
