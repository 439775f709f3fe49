"""The training loop: data parallel + gradient accumulation, mixed precision, NaN skipping, validation,
atomic checkpoints, exact resume and preemption.

    result = train(load_run_config("launch/configs/tiny-bigcode.yaml", overrides))
    sys.exit(result.exit_code)       # EXIT_PREEMPTED (42) after SIGTERM/SIGUSR1: requeue the job

One optimizer step = `num_micro` micro batches per DP rank (global batch / (micro batch x dp)). The loss is the
mean over all loss-masked tokens of the global batch (train.loss_reduction=token_mean; or Megatron's classic
mean per micro batch, averaged); fp32 main grads are averaged over DP. The LR of
step k (1-based) is schedule.lr_at(k); a skipped (NaN/inf) step still consumes its data and its step number.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import megaocto
from megaocto.config.base import ConfigError
from megaocto.config.loader import config_to_dict
from megaocto.config.train import RunConfig
from megaocto import checkpoint as ckpt
from megaocto.training.loggers import MetricsLogger
from megaocto.training.metrics import FLOPS_FORMULA, format_eta, memory_stats, model_tflops_and_mfu, peak_tflops
from megaocto.training.optimizer import MixedPrecisionAdamW
from megaocto.training.sampler import PretrainingSampler, collate, micro_batch_loader, shutdown_loader, to_device
from megaocto.training.schedule import LRSchedule

EXIT_OK = 0
EXIT_PREEMPTED = 42  # saved after SIGTERM/SIGUSR1 (or exit_duration_mins); launchers requeue on this code
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingDiverged(RuntimeError):
    """Too many NaN/inf steps; the last good state was saved before raising."""


EXIT_REASON_FILE = "exit_reason.json"


def write_exit_reason(run_dir: str, reason: str, exit_code: int | None, *, iteration: int | None = None,
                      checkpoint: str | None = None, **extra) -> None:
    """Write {run_dir}/exit_reason.json atomically (rank 0 only: the caller checks). Launchers that cannot see the
    process's exit code (torchrun turns 42 into 1) read it: reason, exit_code, iteration, checkpoint, time.
    A run writes reason "running" (exit_code null) when it starts, so a hard kill leaves that behind."""
    os.makedirs(run_dir, exist_ok=True)
    record = {"reason": reason, "exit_code": exit_code, "iteration": iteration, "checkpoint": checkpoint,
              "time": time.time(), **extra}
    path = os.path.join(run_dir, EXIT_REASON_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def _env_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


@dataclass
class TrainResult:
    iteration: int
    consumed_samples: int
    exit_reason: str  # finished | preempted | exit_interval | exit_duration | already_done
    exit_code: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss of the steps run in this process
    val_losses: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, float] = field(default_factory=dict)  # step -> global grad norm before clipping
    skipped_steps: int = 0
    checkpoint: str | None = None
    rank: int = 0  # global rank of the process that returned this


class _PreemptFlag:
    """Sets a flag on SIGTERM/SIGUSR1 (main thread only); the loop finishes the step, saves and exits."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in PREEMPT_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def resolve_train_iters(cfg: RunConfig, global_batch: int) -> int:
    """Run length in optimizer steps from train.iters | samples | epochs."""
    t = cfg.train
    if t.iters is not None:
        return t.iters
    if t.samples is not None:
        return math.ceil(t.samples / global_batch)
    from megaocto.data.build import epoch_num_samples

    per_epoch = epoch_num_samples(cfg.data, seq_length=cfg.model.seq_length, seed=t.seed)
    return max(1, math.ceil(math.ceil(t.epochs * per_epoch) / global_batch))


class _DataErrorsAsConfigErrors:
    """Turn a missing/unreadable data file or tokenizer found while opening the data into a ConfigError (exit 2) of
    one line naming the config field and the path, with a hint for the common packed-prefix mistake."""

    def __init__(self, data_cfg):
        self.data = data_cfg

    def __enter__(self):
        return self

    def __exit__(self, tp, exc, tb):
        from megaocto.data.indexed import IndexedDatasetError
        from megaocto.data.tokenizer import TokenizerError

        if exc is None or not isinstance(exc, (IndexedDatasetError, TokenizerError, FileNotFoundError)):
            return False
        raise ConfigError(self.describe(exc)) from None

    def describe(self, exc: BaseException) -> str:
        from megaocto.data.tokenizer import TokenizerError

        d = self.data
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, TokenizerError):
            return f"data.tokenizer={d.tokenizer}: {text}"
        for key in ("paths", "valid_paths", "test_paths"):
            for path in getattr(d, key):
                if path and (path in str(exc) or os.path.abspath(path) in str(exc)):
                    return f"data.{key}: {path}: {text}{self._hint(path)}"
        return f"data: {text}"

    def _hint(self, path: str) -> str:
        base = path
        for ext in (".bin", ".idx"):
            if base.endswith(ext):
                base = base[: -len(ext)]
        if self.data.kind == "packed":
            for suffix in ("_inputs_document", "_targets_document"):
                if base.endswith(suffix):
                    return (f"; data.paths takes the prefix {base[: -len(suffix)]} (without {suffix}: "
                            f"P_inputs_document and P_targets_document are found from P)")
        if base != path:
            return f"; data.paths takes the prefix without .bin/.idx: {base}"
        return ""


def _summary_line(summary: dict) -> str:
    """One log line of a dataset's summary() dict; a blend lists its parts briefly."""
    parts = [f"{k}={v}" for k, v in summary.items() if k != "datasets"]
    for i, sub in enumerate(summary.get("datasets") or []):
        parts.append(f"[{i}] " + " ".join(f"{k}={sub[k]}" for k in ("kind", "prefix", "documents", "samples")
                                          if k in sub))
    return ", ".join(parts)


def masked_loss_sum(per_token: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of loss x loss_mask, sum of loss_mask) of a micro batch's fp32 per-token loss [b, s]."""
    mask = batch["loss_mask"].to(per_token.dtype)
    return (per_token * mask).sum(), mask.sum()


def micro_batch_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of loss x loss_mask, sum of loss_mask) over one micro batch, fp32 scalars."""
    kwargs = {k: batch[k] for k in ("position_ids", "segment_ids") if k in batch}
    per_token = model(batch["input_ids"], labels=batch["labels"], **kwargs)  # [b, s] fp32
    return masked_loss_sum(per_token, batch)


def micro_batch_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Masked mean of the per-token loss of one micro batch (fp32 scalar)."""
    total, count = micro_batch_loss_sum(model, batch)
    return total / count.clamp(min=1.0)


class Trainer:
    """Holds the pieces of one run; `run()` executes it. Use :func:`train` unless you need the parts."""

    def __init__(self, cfg: RunConfig, pc=None, *, stream=None):
        from megaocto.data.build import build_datasets
        from megaocto.model import build_model
        from megaocto.model.flops import flops_per_token
        from megaocto.parallel.context import ParallelContext
        from megaocto.parallel.random import seed_everything

        cfg.validate()
        self.cfg = cfg
        p = cfg.parallel
        self.pc = pc or ParallelContext.init(tp=p.tp, pp=p.pp, sequence_parallel=p.sequence_parallel,
                                             backend=p.backend, timeout_minutes=p.timeout_minutes)
        pc = self.pc
        if pc.pp > 1 and cfg.eval.humanevalpack.enabled:
            raise ConfigError("eval.humanevalpack runs generation inside training, which needs parallel.pp=1; "
                              "evaluate the pp > 1 checkpoints afterwards")
        cfg.model.validate(pc.tp)
        self.num_micro = cfg.train.microbatches(pc.dp)
        self.global_batch = self.num_micro * cfg.train.micro_batch_size * pc.dp
        with _DataErrorsAsConfigErrors(cfg.data):
            self.total_iters = resolve_train_iters(cfg, self.global_batch)
        self.seq_length = cfg.model.seq_length
        self._check_tokenizer_vocab()
        self.bf16 = cfg.train.dtype == "bf16"
        self.log = MetricsLogger(cfg.logging, enabled=pc.rank == 0, run_config=config_to_dict(cfg), stream=stream)
        self.log.info(f"megaocto {megaocto.__version__} | {pc.describe()} | dtype {cfg.train.dtype} | "
                      f"global batch {self.global_batch} = {cfg.train.micro_batch_size} x {pc.dp} dp x "
                      f"{self.num_micro} micro | {self.total_iters} steps")

        seed_everything(cfg.train.seed, pc)
        build = dict(dtype=torch.bfloat16 if self.bf16 else torch.float32, device=pc.device,
                     recompute=cfg.train.recompute, recompute_num_layers=cfg.train.recompute_num_layers,
                     pp_layers=cfg.parallel.pp_layers,  # checked against pp at every pp (one count per stage)
                     virtual_pp=cfg.parallel.virtual_pp)
        self.virtual_pp = cfg.parallel.virtual_pp
        if self.virtual_pp > 1 and (pc.pp == 1 or self.num_micro % pc.pp):
            raise ConfigError(f"parallel.virtual_pp={self.virtual_pp} (interleaved pipeline) needs parallel.pp > 1 and "
                              f"the micro batches per DP rank ({self.num_micro}) divisible by pp={pc.pp}")
        if self.virtual_pp > 1 and pc.pp == 2 and pc.backend == "nccl":
            raise ConfigError("parallel.virtual_pp > 1 at pp=2 sends activations and grads between the same two ranks "
                              "and tells them apart by P2P tags, which NCCL ignores; use pp >= 3 or virtual_pp=1")
        if pc.pp == 1:
            self.model = build_model(cfg.model, pc, **build)
        else:  # every stage draws the weights from train.seed as pp=1 does (the same model at every pp); the
            # per-stage RNG streams (seed + 100·pp_rank, dropout) stay as seeded above
            with torch.random.fork_rng(devices=[pc.device] if pc.device.type == "cuda" else []):
                torch.manual_seed(cfg.train.seed)
                self.model = build_model(cfg.model, pc, **build)
        if pc.pp > 1:  # a collective over the whole PP group first: NCCL then has the group's communicator before
            dist.barrier(group=pc.pp_group)  # the first batch_isend_irecv (where not every rank talks to every one)
        # tied word embeddings under pp: the first and last stage hold a copy each, kept equal by summing their grads
        self._tied_stage = pc.pp > 1 and cfg.model.tie_embeddings and (pc.is_first_stage or pc.is_last_stage)
        self._p2p_shape = (cfg.train.micro_batch_size,
                           self.seq_length // pc.tp if pc.sequence_parallel else self.seq_length, cfg.model.hidden_size)
        self.model.train()
        self.iteration, self.consumed, self.skipped = 0, 0, 0
        self._loss_tokens = torch.zeros((), dtype=torch.int64, device=pc.device)  # this DP rank, since the last log
        self._diverged_checkpoint = None
        self._lora_base = None  # LoRA runs: the base checkpoint reference saved with the adapters
        state = self._load_model_checkpoint()
        if cfg.model.lora.enabled and self._lora_base is None:  # base from the seed: resume rebuilds and checks it
            from megaocto.model.lora import base_fingerprint

            self._lora_base = {"path": None, "iteration": None, "fingerprint": base_fingerprint(self.model)}
        self.optimizer = MixedPrecisionAdamW(self.model, cfg.optimizer, pc, bf16=self.bf16,
                                             bucket_mb=cfg.train.grad_bucket_mb,
                                             overlap_grad_reduce=cfg.train.overlap_grad_reduce,
                                             zero1=cfg.train.zero1)
        self.schedule = LRSchedule.from_config(cfg.schedule, cfg.optimizer.lr, self.total_iters)
        self._load_rest(state)
        self._warn_zero_lr_steps()
        self.forward_model = torch.compile(self.model) if cfg.train.compile else self.model

        need_valid = cfg.eval.interval > 0 and cfg.eval.iters > 0
        # One process per node builds missing index caches (atomic files); the others wait for them.
        with _DataErrorsAsConfigErrors(cfg.data):
            self.datasets = build_datasets(
                cfg.data, seq_length=self.seq_length, seed=cfg.train.seed, may_build=pc.local_rank == 0,
                num_samples={"train": self.total_iters * self.global_batch,
                             "valid": cfg.eval.iters * self.global_batch if need_valid else 0, "test": 0})
        for split, ds in self.datasets.items():
            if ds is not None and hasattr(ds, "summary"):
                self.log.info(f"data {split}: {_summary_line(ds.summary())}")
        if need_valid and self.datasets.get("valid") is None:
            self.log.info("warning: eval.interval is set but the data has no valid split; validation disabled")

        self.humanevalpack = None  # eval.humanevalpack: pass@k from inside training (megaocto/eval/hook.py)
        if cfg.eval.humanevalpack.enabled:
            from megaocto.eval.hook import HumanEvalPackHook
            from megaocto.eval.humanevalpack import DataError
            from megaocto.eval.toolchains import ToolchainError

            try:
                self.humanevalpack = HumanEvalPackHook(cfg.eval, tokenizer_path=cfg.data.tokenizer,
                                                       run_dir=cfg.logging.run_dir, pc=pc, total_iters=self.total_iters,
                                                       log=lambda it, m, secs: self.log.log_eval(it, m, elapsed=secs))
            except (DataError, ToolchainError, ValueError) as e:
                raise ConfigError(f"eval.humanevalpack: {e}") from None

        self.flops_per_token = flops_per_token(cfg.model, self.seq_length)
        device_name = torch.cuda.get_device_name(pc.device) if pc.device.type == "cuda" else None
        self.peak = cfg.logging.peak_tflops or peak_tflops(device_name, cfg.train.dtype)
        self.log.info(f"model flops/token {self.flops_per_token:.4g} ({FLOPS_FORMULA}); peak TFLOP/s per device: "
                      f"{self.peak if self.peak else 'n/a (set logging.peak_tflops)'}")

    def _check_tokenizer_vocab(self) -> None:
        """Up front, before building anything: the tokenizer's ids must fit the model's embedding. A tokenizer vocab
        larger than model.vocab_size is a config error; smaller is fine (a model vocab may be padded)."""
        if not self.cfg.data.tokenizer:
            return
        from megaocto.data.tokenizer import load_tokenizer

        with _DataErrorsAsConfigErrors(self.cfg.data):
            vocab = int(load_tokenizer(self.cfg.data.tokenizer).vocab_size)
        if vocab > self.cfg.model.vocab_size:
            raise ConfigError(
                f"data.tokenizer={self.cfg.data.tokenizer} has {vocab} tokens but model.vocab_size="
                f"{self.cfg.model.vocab_size}: token ids >= {self.cfg.model.vocab_size} would not fit the embedding; "
                f"set model.vocab_size to at least {vocab} (or use the model's tokenizer)")

    # ------------------------------------------------------------------ checkpoint loading
    def _load_model_checkpoint(self) -> dict | None:
        c = self.cfg.checkpoint
        self._own_resume = bool(c.auto_resume and c.save and ckpt.read_tracker(c.save) is not None)
        self._release = False
        source = c.save if self._own_resume else c.load
        if not source:
            return None
        if not self._own_resume and not (c.save and os.path.abspath(c.load) == os.path.abspath(c.save)):
            self._check_explicit_load(c.load)  # load == save with nothing there yet is a fresh start
        loaded = ckpt.load_checkpoint(source, self.pc)
        if loaded is None:
            if c.finetune:
                raise ConfigError(f"checkpoint.finetune is set but {source} has no {ckpt.TRACKER}")
            self.log.info(f"no checkpoint in {source}; starting from scratch")
            return None
        state, _meta, it = loaded
        self._ckpt_meta = _meta or {}
        self._ckpt_dir = ckpt.resolve_dir(source, it)
        self._ckpt_file = os.path.join(self._ckpt_dir, ckpt.rank_dir_name(self.pc.tp_rank, self.pc.pp_rank, self.pc.pp),
                                       ckpt.MODEL_FILE)
        self._release = it == "release"  # Megatron's release checkpoints are weights only (finetune semantics)
        if self.cfg.model.lora.enabled:  # base checkpoint -> LoRA finetune start; adapter checkpoint -> its base too
            from megaocto.model.lora_checkpoint import load_lora_checkpoint

            self._lora_base, adapters = load_lora_checkpoint(self.model, state, source, it, self.pc, self._ckpt_file)
            self._release = self._release or not adapters  # a base checkpoint: weights only (finetune semantics)
            self.log.info(f"{'resuming LoRA adapters' if adapters else 'LoRA on base weights'} from "
                          f"{ckpt.iter_dir_name(it)} in {source} (base {self._lora_base['path']})")
            return state
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:  # missing/unexpected keys or shape mismatches: another architecture
            from megaocto.config.model import weight_shape_differences

            saved = ((_meta or {}).get("config") or {}).get("model") or {}
            diff = weight_shape_differences(saved, config_to_dict(self.cfg)["model"])
            first = str(e).strip().splitlines()
            raise ConfigError(
                f"checkpoint {self._ckpt_file} does not fit the configured model: "
                f"{', '.join(diff) if diff else 'its parameters differ'}; configure the checkpoint's architecture "
                f"({first[1].strip() if len(first) > 1 else first[0] if first else e})") from None
        self.log.info(f"{'resuming' if self._own_resume else 'loaded model weights'} from "
                      f"{ckpt.iter_dir_name(it)} in {source}")
        return state

    @staticmethod
    def _check_explicit_load(load: str) -> None:
        """An explicit checkpoint.load (not the run's own save dir) must hold a checkpoint: a typo or an iter_* dir
        must not silently train from scratch."""
        if not os.path.isdir(load):
            raise ConfigError(f"checkpoint.load={load}: no such directory")
        if ckpt.read_tracker(load) is not None:
            return
        hint = ""
        parent = os.path.dirname(os.path.abspath(load))
        if re.match(r"^(iter_\d+|release)(\.old)?$", os.path.basename(os.path.normpath(load))) or \
                os.path.exists(os.path.join(parent, ckpt.TRACKER)):
            hint = f"; it looks like one checkpoint iteration: pass its parent, checkpoint.load={parent}"
        elif ckpt.list_checkpoints(load):
            hint = f" but has iter_* dirs {ckpt.list_checkpoints(load)[-3:]} (write the tracker file to pick one)"
        raise ConfigError(f"checkpoint.load={load} has no {ckpt.TRACKER}{hint}")

    def _load_rest(self, state: dict | None) -> None:
        from megaocto.parallel.random import set_rng_state

        c = self.cfg.checkpoint
        own = self._own_resume  # a requeued run resumes its own checkpoint fully, whatever the finetune switches
        if state is None or ((c.finetune or self._release) and not own):
            return
        # A requeued run (own) restores the optimizer whenever the checkpoint has it (exact resume); a checkpoint
        # saved with save_optim=false resumes with a fresh optimizer only when no_load_optim says so.
        if "optimizer" not in state:
            if not c.no_load_optim:
                raise ConfigError(f"checkpoint file {self._ckpt_file} has no optimizer state (saved with "
                                  f"checkpoint.save_optim=false); set checkpoint.no_load_optim=true to resume with a "
                                  f"fresh optimizer (AdamW moments restart; fp32 masters from the loaded weights)")
            self.log.info(f"warning: {self._ckpt_file} has no optimizer state (saved with checkpoint.save_optim=false); "
                          f"the optimizer starts fresh (checkpoint.no_load_optim)")
        elif own or not c.no_load_optim:
            self.optimizer.load_state_dict(state["optimizer"])
        if own or not c.no_load_rng:
            set_rng_state(state["rng_state"][0], self.pc)
        if own or not c.reset_progress:
            self.iteration = int(state["iteration"])
            self.consumed = int(state["data"]["consumed_samples"])
            self.skipped = int(state["data"].get("skipped_steps", 0))
            self._check_schedule(state.get("opt_param_scheduler"))
            self._log_changes_since_checkpoint()

    def _warn_zero_lr_steps(self) -> None:
        """Loud warning when more than the final step of what is left runs at lr 0 (no update): e.g. a finished run
        extended with checkpoint.use_checkpoint_scheduler keeps a decay that already reached min_lr=0."""
        s, first, last = self.schedule, self.iteration + 1, self.total_iters
        if first > last or s.min_lr > 0 or s.style not in ("linear", "cosine"):
            return
        zero_from = max(first, s.decay_steps, s.warmup_steps + 1)  # lr_at(k) == min_lr == 0 from here on
        zero = last - zero_from + 1
        if zero <= 1:  # only the last step: the documented end of a decay (as in Megatron)
            return
        which = "every one of the remaining" if zero_from == first else f"{zero} of the remaining"
        self.log.info(
            f"WARNING: {which} {last - first + 1} steps ({zero_from}..{last}) run at lr 0 and do not update the "
            f"model: the LR schedule decays to schedule.min_lr=0 at step {s.decay_steps}"
            f"{' (the checkpoint schedule: checkpoint.use_checkpoint_scheduler)' if self.cfg.checkpoint.use_checkpoint_scheduler else ''}. "
            f"Set schedule.decay_iters >= {last} with checkpoint.override_scheduler=true, or schedule.min_lr > 0")

    # Not training-relevant (where/how often to log, save and evaluate; run length; data loading mechanics).
    _UNTRACKED = {"train.iters", "train.samples", "train.epochs", "train.exit_interval", "train.exit_duration_mins",
                  "train.debug_nan_iters", "train.compile", "data.num_workers", "data.cache_dir",
                  "parallel.backend", "parallel.timeout_minutes"}

    def _log_changes_since_checkpoint(self) -> None:
        """A resumed run that continues with other settings (global batch, dtype, seed, data, optimizer, ...) says
        so in one line; it is allowed (Megatron allows it too) but must not go unnoticed."""
        saved = (getattr(self, "_ckpt_meta", None) or {}).get("config")
        if not saved:
            return
        now = config_to_dict(self.cfg)
        saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(now))  # tuples vs lists, as stored
        saved_dp = int(self._ckpt_meta.get("dp", self.pc.dp))
        for cfg, dp in ((saved, saved_dp), (now, self.pc.dp)):  # compare the effective global batch
            t = cfg.get("train", {})
            if t.get("global_batch_size") is None and "micro_batch_size" in t:
                t["global_batch_size"] = t["micro_batch_size"] * dp
        changes = []
        for section in ("model", "parallel", "data", "train", "optimizer", "schedule"):
            a, b = saved.get(section) or {}, now.get(section) or {}
            for key in b:
                name = f"{section}.{key}"
                if key in a and a[key] != b[key] and name not in self._UNTRACKED:
                    changes.append(f"{name} {a[key]!r} -> {b[key]!r}")
        if saved_dp != self.pc.dp:
            changes.append(f"dp {saved_dp} -> {self.pc.dp}")
        if changes:
            self.log.info(f"changed since checkpoint {ckpt.iter_dir_name(self.iteration)}: {'; '.join(changes)}")

    def _check_schedule(self, saved: dict | None) -> None:
        """A resumed run continues the checkpoint's LR curve: refuse a configured schedule that differs from the
        saved one (e.g. another train.iters moves the decay end) unless one of the override switches is set."""
        c = self.cfg.checkpoint
        if not saved:
            return
        current = self.schedule.state_dict()
        diff = [k for k in current if k in saved and saved[k] != current[k]]
        if not diff:
            return
        described = ", ".join(f"{k}={saved[k]!r} (configured: {current[k]!r})" for k in diff)
        if c.use_checkpoint_scheduler:
            self.schedule = LRSchedule(**{k: saved.get(k, v) for k, v in current.items()})
            self.log.info(f"using the checkpoint's LR schedule: {described}")
        elif c.override_scheduler:
            self.log.info(f"warning: checkpoint.override_scheduler: the configured LR schedule replaces the "
                          f"checkpoint's: {described}")
        else:
            raise ConfigError(
                f"checkpoint {self._ckpt_dir} was saved with a different LR schedule: {described} (the schedule "
                f"follows optimizer.lr, schedule.* and, without schedule.decay_iters, the run length train.iters/"
                f"samples/epochs). Resume with the same settings, or set checkpoint.use_checkpoint_scheduler=true "
                f"to keep the checkpoint's schedule or checkpoint.override_scheduler=true to use the configured one")

    # ------------------------------------------------------------------ saving
    def checkpoint_state(self) -> dict | None:
        """Collective. This rank's model_optim_rng.pt contents where it is written (DP rank 0), else None.

        Tensors are the live ones (no copies: the save is synchronous). With train.zero1 the optimizer state is
        gathered from every DP rank's shards (the one collective part); otherwise non-writing ranks build nothing.
        """
        from megaocto.parallel.random import get_rng_state

        writes = ckpt.writes_model_files(self.pc)
        optimizer = None
        if self.cfg.checkpoint.save_optim and (writes or self.optimizer.zero1):
            optimizer = self.optimizer.state_dict()
        if not writes:
            return None
        if self._lora_base is not None:  # LoRA: the adapters and the reference to the frozen base only
            from megaocto.model.lora import lora_state_dict

            model_state = lora_state_dict(self.model)
        else:
            model_state = self.model.state_dict()
        state = {"checkpoint_version": 3.0, "iteration": self.iteration, "model": model_state,
                 "opt_param_scheduler": {**self.schedule.state_dict(), "num_steps": self.iteration},
                 "rng_state": [get_rng_state(self.pc)],
                 "data": {"consumed_samples": self.consumed, "skipped_steps": self.skipped}}
        if optimizer is not None:
            state["optimizer"] = optimizer
        if self._lora_base is not None:
            state["lora_base"] = self._lora_base
        return state

    def save(self, reason: str) -> str | None:
        c = self.cfg.checkpoint
        if not c.save:
            return None
        state = self.checkpoint_state()  # None where nothing is written
        meta = {"consumed_samples": self.consumed, "skipped_steps": self.skipped, "reason": reason,
                "megaocto_version": megaocto.__version__, "config": config_to_dict(self.cfg)}
        path = ckpt.save_checkpoint(c.save, self.iteration, state, meta, self.pc, keep_last=c.keep_last)
        self.log.info(f"saved checkpoint {path} ({reason})")
        return path

    # ------------------------------------------------------------------ steps
    def _sum_dp(self, value: torch.Tensor) -> torch.Tensor:
        if self.pc.dp > 1:
            value = value.clone()
            dist.all_reduce(value, group=self.pc.dp_group)
        return value

    def _from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        """The last pipeline stage's value on every stage (the others computed zeros): a sum over the PP group."""
        if self.pc.pp > 1:
            if not self.pc.is_last_stage:
                value = torch.zeros_like(value)
            value = value.clone()
            dist.all_reduce(value, group=self.pc.pp_group)
        return value

    def _model_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def _reduce_mean_dp(self, value: torch.Tensor) -> torch.Tensor:
        return self._sum_dp(value) / self.pc.dp if self.pc.dp > 1 else value

    def train_step(self, batches) -> tuple[float, float, bool]:
        """Forward/backward `num_micro` micro batches (from the iterator `batches` of CPU batch dicts), reduce grads,
        clip, update. -> (loss, grad norm, applied)."""
        from megaocto.parallel.grads import allreduce_sequence_parallel_grads

        step = self.iteration + 1
        self.optimizer.zero_grad()
        micro = [to_device(next(batches), self.pc.device) for _ in range(self.num_micro)]
        token_mean = self.cfg.train.loss_reduction == "token_mean"
        if token_mean:  # every loss token of the global batch weighs the same, across micro batches and DP ranks
            tokens = self._sum_dp(torch.stack([b["loss_mask"].float().sum() for b in micro]).sum()).clamp(min=1.0)
        loss_acc = torch.zeros((), dtype=torch.float32, device=self.pc.device)
        for b in micro:  # tokens that carry loss (packed SFT: targets only), for the loss tok/s metric; no sync
            self._loss_tokens += (b["loss_mask"] > 0).sum()

        def scaled_loss(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
            """The micro batch's loss to differentiate; adds what the step reports to loss_acc."""
            if step in self.cfg.train.debug_nan_iters:
                total = total * float("nan")
            if token_mean:
                loss_acc.add_(total.detach())
                return total * (self.pc.dp / tokens)  # x dp: the DP grad all-reduce averages
            loss = total / count.clamp(min=1.0)
            loss_acc.add_(loss.detach())
            return loss / self.num_micro

        if self.pc.pp == 1:
            for i, batch in enumerate(micro):
                scaled = scaled_loss(*micro_batch_loss_sum(self.forward_model, batch))
                self.optimizer.before_backward(last_micro_batch=i == self.num_micro - 1)
                scaled.backward()
        else:
            from megaocto.training.pipeline import (allreduce_embedding_grads, forward_backward_1f1b,
                                                    forward_backward_interleaved)

            # The tied embedding's grads are summed over the first and last stage before the DP reduction, so
            # those two stages start no DP bucket reduction from inside the backward (no overlap there).
            overlap = not self._tied_stage
            schedule = forward_backward_1f1b if self.virtual_pp == 1 else \
                functools.partial(forward_backward_interleaved, virtual=self.virtual_pp)
            schedule(self.forward_model, micro, self.pc, shape=self._p2p_shape, dtype=self._model_dtype(),
                     loss_fn=lambda per_token, batch: scaled_loss(*masked_loss_sum(per_token, batch)),
                     before_backward=lambda last: self.optimizer.before_backward(last_micro_batch=last and overlap))
            if self._tied_stage:
                allreduce_embedding_grads(self.model, self.pc)
        # Finalize the grads in Megatron's finalize_model_grads order: first wait for the DP all-reduces (with
        # overlap_grad_reduce they are still in flight over main_grad), then the TP reduction of the
        # sequence-parallel grads, which reads and rewrites that same memory.
        self.optimizer.finish_grad_sync()
        if self.pc.sequence_parallel:
            allreduce_sequence_parallel_grads(self.model, self.pc)
        step_loss = self._sum_dp(loss_acc) / tokens if token_mean else self._reduce_mean_dp(loss_acc / self.num_micro)
        step_loss = self._from_last_stage(step_loss)
        norm = self.optimizer.clip_grad_norm(self.cfg.optimizer.clip_grad)
        loss_v, norm_v = float(step_loss), float(norm)
        applied = math.isfinite(loss_v) and math.isfinite(norm_v)
        if applied:
            self.optimizer.step(self.schedule.lr_at(step))
        return loss_v, norm_v, applied

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted mean validation loss over eval.iters global batches of the valid split (the same samples
        every time)."""
        ds = self.datasets.get("valid")
        if ds is None:
            return None
        self.model.eval()
        sampler = iter(PretrainingSampler(len(ds), 0, self.cfg.train.micro_batch_size, self.pc.dp_rank, self.pc.dp))
        sums = torch.zeros(2, dtype=torch.float32, device=self.pc.device)  # [sum of loss x mask, sum of mask]
        micro = []
        for n, indices in enumerate(sampler):
            if n == self.cfg.eval.iters * self.num_micro:
                break
            if self.pc.pp == 1:
                sums += torch.stack(micro_batch_loss_sum(self.forward_model, collate(ds, indices, self.pc.device)))
            else:
                micro.append(collate(ds, indices, self.pc.device))
        if micro:
            from megaocto.training.pipeline import forward_only, forward_only_interleaved

            run = forward_only if self.virtual_pp == 1 else \
                functools.partial(forward_only_interleaved, virtual=self.virtual_pp)
            run(self.forward_model, micro, self.pc, shape=self._p2p_shape, dtype=self._model_dtype(),
                loss_fn=lambda per_token, batch: sums.add_(torch.stack(masked_loss_sum(per_token, batch))))
        self.model.train()
        sums = self._from_last_stage(self._sum_dp(sums))
        return float(sums[0] / sums[1].clamp(min=1.0))

    def train_loader(self):
        """This rank's training micro batches, starting after the consumed samples."""
        sampler = PretrainingSampler(len(self.datasets["train"]), self.consumed, self.cfg.train.micro_batch_size,
                                     self.pc.dp_rank, self.pc.dp)
        return micro_batch_loader(self.datasets["train"], sampler, num_workers=self.cfg.data.num_workers,
                                  pin_memory=self.pc.device.type == "cuda", seed=self.cfg.train.seed)

    def _stop_requested(self, preempt: _PreemptFlag, start_time: float) -> str | None:
        t = self.cfg.train
        local = 0
        if preempt.signum is not None:
            local = 2
        elif t.exit_duration_mins is not None and time.time() - start_time >= 60 * t.exit_duration_mins:
            local = 1
        if self.pc.world_size > 1:  # every rank must agree to stop at the same step
            flag = torch.tensor([local], dtype=torch.int64, device=self.pc.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item())
        if local == 2:
            return "preempted"
        if local == 1:
            return "exit_duration"
        if t.exit_interval and self.iteration % t.exit_interval == 0 and self.iteration < self.total_iters:
            return "exit_interval"
        return None

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        pc = self.pc
        result = TrainResult(self.iteration, self.consumed, "finished", EXIT_OK, skipped_steps=self.skipped,
                             rank=pc.rank)
        if self.iteration >= self.total_iters:
            self.log.info(f"checkpoint is at step {self.iteration} >= {self.total_iters} steps; nothing to do")
            result.exit_reason = "already_done"
            self.log.close()
            self._write_exit_reason(result.exit_reason, result.exit_code)
            return result
        self._write_exit_reason("running", None)
        try:
            result = self._run_loop(result)
        except TrainingDiverged as e:
            self._write_exit_reason("diverged", 1, checkpoint=self._diverged_checkpoint, message=str(e))
            raise
        except Exception as e:
            self._write_exit_reason("config_error" if isinstance(e, ConfigError) else "error",
                                    2 if isinstance(e, ConfigError) else 1, message=f"{type(e).__name__}: {e}")
            raise
        except KeyboardInterrupt:  # Ctrl-C: no checkpoint is written (SIGTERM/SIGUSR1 are the save-and-exit path)
            self._write_exit_reason("interrupted", 130, message="KeyboardInterrupt (SIGINT); nothing saved")
            raise
        self._write_exit_reason(result.exit_reason, result.exit_code, checkpoint=result.checkpoint)
        return result

    def _write_exit_reason(self, reason: str, exit_code: int | None, *, checkpoint: str | None = None, **extra):
        if self.pc.rank == 0:
            write_exit_reason(self.cfg.logging.run_dir, reason, exit_code, iteration=self.iteration,
                              checkpoint=checkpoint, consumed_samples=self.consumed, skipped_steps=self.skipped,
                              **extra)

    def _run_loop(self, result: TrainResult) -> TrainResult:
        cfg = self.cfg
        batches = iter(self.train_loader())
        start = interval_start = time.time()
        interval_steps, interval_loss, interval_n = 0, 0.0, 0
        with _PreemptFlag() as preempt:
            try:
                while self.iteration < self.total_iters:
                    loss, norm, applied = self.train_step(batches)
                    self.iteration += 1
                    self.consumed += self.global_batch
                    result.losses[self.iteration] = loss
                    result.grad_norms[self.iteration] = norm
                    interval_steps += 1
                    if applied:
                        interval_loss += loss
                        interval_n += 1
                    else:
                        self.skipped += 1
                        self.log.info(f"warning: step {self.iteration} has non-finite loss {loss} / grad norm {norm}; "
                                      f"skipped (no update), {self.skipped} skipped so far "
                                      f"(limit train.max_skipped_steps={cfg.train.max_skipped_steps})")
                        if self.skipped > cfg.train.max_skipped_steps:
                            if self.iteration % cfg.logging.log_interval and self.iteration != self.total_iters:
                                self._log_interval(loss if interval_n == 0 else interval_loss / interval_n, norm,
                                                   interval_steps, time.time() - interval_start)  # the last step
                            path = self._diverged_checkpoint = self.save("diverged")
                            raise TrainingDiverged(
                                f"{self.skipped} steps had non-finite loss or grad norm (limit "
                                f"train.max_skipped_steps={cfg.train.max_skipped_steps}); stopping at step "
                                f"{self.iteration}. Last good state saved to {path or 'nowhere (checkpoint.save unset)'}; "
                                f"lower optimizer.lr, raise schedule.warmup_iters or inspect the data")
                    if self.iteration % cfg.logging.log_interval == 0 or self.iteration == self.total_iters:
                        elapsed = time.time() - interval_start
                        self._log_interval(loss if interval_n == 0 else interval_loss / interval_n, norm,
                                           interval_steps, elapsed)
                        interval_start, interval_steps, interval_loss, interval_n = time.time(), 0, 0.0, 0
                    paused = time.time()  # validation and saving do not count towards tokens/s
                    if cfg.eval.interval and (self.iteration % cfg.eval.interval == 0
                                              or self.iteration == self.total_iters):
                        val = self.evaluate()
                        if val is not None:
                            result.val_losses[self.iteration] = val
                            self.log.log_valid(self.iteration, val)
                    if self.humanevalpack is not None and self.humanevalpack.due(self.iteration):
                        self._run_humanevalpack()
                    reason = self._stop_requested(preempt, start)
                    if reason is not None:
                        result.checkpoint = self.save(reason)
                        result.exit_reason = reason
                        result.exit_code = EXIT_PREEMPTED if reason in ("preempted", "exit_duration") else EXIT_OK
                        if reason == "preempted":
                            self.log.info(f"received signal {preempt.signum}: saved at step {self.iteration}; "
                                          f"exiting with code {EXIT_PREEMPTED} (requeue)")
                        break
                    if cfg.checkpoint.save_interval and self.iteration % cfg.checkpoint.save_interval == 0 \
                            and self.iteration < self.total_iters:
                        self.save("interval")
                    interval_start += time.time() - paused
                else:
                    result.checkpoint = self.save("finished")
            finally:
                shutdown_loader(batches)  # the workers ignore SIGTERM: never leave them to the exit handler
                self.log.close()
        result.iteration, result.consumed_samples, result.skipped_steps = self.iteration, self.consumed, self.skipped
        return result

    def _run_humanevalpack(self) -> None:
        """Generation on every rank (collective over TP), execution on rank 0; the hook logs eval/<task>/<lang>/pass@k
        through the callback it was given (the same sinks as train/valid: JSONL kind "eval", TensorBoard/W&B group
        "eval"; nothing on non-scoring ranks)."""
        self.humanevalpack.run(self.model, self.iteration)

    def _log_interval(self, loss: float, norm: float, steps: int, elapsed: float) -> None:
        # tokens/s counts every position of every row (global batch x seq_length, padding of packed rows included:
        # what the hardware processed, the basis of TFLOP/s and MFU); loss_tokens_per_s counts the tokens with a
        # non-zero loss mask (packed SFT: the targets) over all DP ranks. Every rank calls this (the all-reduce).
        loss_tokens = int(self._sum_dp(self._loss_tokens))
        self._loss_tokens.zero_()
        tokens_per_s = steps * self.global_batch * self.seq_length / max(elapsed, 1e-9)
        per_device = tokens_per_s / self.pc.world_size
        tflops, mfu = model_tflops_and_mfu(self.flops_per_token, per_device, self.peak)
        step_time = elapsed / max(steps, 1)
        metrics = {"consumed_samples": self.consumed, "loss": loss,
                   "lr": self.schedule.lr_at(self.iteration), "grad_norm": norm,
                   "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": per_device,
                   "loss_tokens_per_s": loss_tokens / max(elapsed, 1e-9),
                   "tflops_per_device": tflops, "mfu": mfu, "step_time_s": step_time,
                   "skipped_steps": self.skipped,
                   "eta": format_eta(step_time * (self.total_iters - self.iteration)),
                   **memory_stats(self.pc.device)}
        self.log.log_train(self.iteration, metrics, total_iters=self.total_iters)


def train(cfg: RunConfig, pc=None, *, stream=None) -> TrainResult:
    """Run training as configured; returns a TrainResult (exit_code EXIT_PREEMPTED after a preemption save).
    Every exit (also a config error found while setting up) leaves {run_dir}/exit_reason.json from rank 0."""
    try:
        trainer = Trainer(cfg, pc, stream=stream)
    except Exception as e:  # a stale exit_reason.json of an earlier run must not survive a failed start
        if (pc.rank if pc is not None else _env_rank()) == 0:
            config = isinstance(e, ConfigError)
            write_exit_reason(cfg.logging.run_dir, "config_error" if config else "error", 2 if config else 1,
                              message=str(e) if config else f"{type(e).__name__}: {e}")
        raise
    return trainer.run()
