"""Load a run config from YAML/TOML plus `--section.field VALUE` overrides into typed dataclasses.

    cfg = load_run_config("launch/configs/tiny-bigcode.yaml", ["--train.iters", "20", "--parallel.tp=2"])

Rules: `model.preset` is applied first (ModelConfig.from_preset), then explicit model fields; file values
are checked against the field types; CLI values are parsed to the field's type; an unknown key (file or
CLI) is an error naming where it came from and the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from typing import Any

from megaocto.config.base import ConfigError, field_docs

_NONE_WORDS = ("none", "null", "~", "")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


# ----------------------------------------------------------------------------------------- file reading
def read_config_file(path: str) -> tuple[dict, dict[str, int]]:
    """Parse YAML (.yaml/.yml) or TOML (.toml); returns (nested dict, {dotted key: line number})."""
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".toml"):
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        return data, _toml_lines(text)
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
            lines = _yaml_lines(yaml.compose(text))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...)")
        return data, lines
    raise ConfigError(f"{path}: unknown config format; use .yaml, .yml or .toml")


def _yaml_lines(node, prefix: str = "") -> dict[str, int]:
    lines: dict[str, int] = {}
    if node is not None and node.tag.endswith(":map"):
        for key, value in node.value:
            name = f"{prefix}{key.value}"
            lines[name] = key.start_mark.line + 1
            lines.update(_yaml_lines(value, name + "."))
    return lines


def _toml_lines(text: str) -> dict[str, int]:
    lines: dict[str, int] = {}
    section = ""
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if m := re.match(r"^\[\s*([\w.\-]+)\s*\]", s):
            section = m.group(1) + "."
            lines.setdefault(m.group(1), i)
        elif m := re.match(r"^([\w.\-\"']+)\s*=", s):
            lines.setdefault(section + m.group(1).strip("\"'"), i)
    return lines


# ----------------------------------------------------------------------------------------- overrides
def parse_overrides(argv: list[str]) -> list[tuple[str, str | None]]:
    """`--a.b VALUE`, `--a.b=VALUE` or a bare `--a.b` (a bool flag) -> [(dotted key, raw value or None)]."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"command line: expected --section.field VALUE, got {tok!r}")
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            out.append((key, value))
            i += 1
        elif i + 1 < len(argv) and not (argv[i + 1].startswith("--") and len(argv[i + 1]) > 2):
            out.append((key, argv[i + 1]))
            i += 2
        else:
            out.append((key, None))
            i += 1
    return out


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"command line: --{key} sets inside {p!r}, which is not a section")
        node = nxt
    node[parts[-1]] = value


class _Bare:
    """A bare `--section.flag` on the command line: true for a bool field, an error for any other."""

    def __repr__(self):
        return "<bare flag>"


_BARE = _Bare()


def _bare_value(tp, where: str, dotted: str) -> str:
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if bool in args:
        return "true"
    raise ConfigError(f"{where}: --{dotted} needs a value (only true/false fields can be given bare)")


# ----------------------------------------------------------------------------------------- typing
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, from_cli: bool, where: str) -> Any:
    """Check/convert one value to the annotated type `tp` (CLI strings are parsed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (from_cli and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            if len(args) < len(typing.get_args(tp)):
                return None
            raise ConfigError(f"{where}: a value is required")
        errors = []
        for a in args:
            try:
                return _convert(value, a, from_cli, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin in (list, tuple) or tp in (list, tuple):
        origin = origin or tp
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if from_cli and isinstance(value, str):
            import yaml

            s = value.strip()
            value = yaml.safe_load(s) if s.startswith("[") else [v for v in s.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [_convert(v, item_tp, from_cli, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if from_cli and isinstance(value, str):
            import yaml

            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, allowed))} (got {value!r})")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        if value is None and from_cli:
            return True  # a bare --section.flag
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if from_cli or isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if value is None:
        raise ConfigError(f"{where}: a value is required")
    return value


def _all_keys(cls, prefix: str = "") -> list[str]:
    """Every valid dotted key: sections, fields and `preset` of sections built with from_preset (model.preset)."""
    keys = []
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if prefix and hasattr(cls, "from_preset") and "preset" not in names:
        keys.append(prefix + "preset")
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if _is_dataclass_type(hints[f.name]):
            keys += _all_keys(hints[f.name], prefix + f.name + ".")
    return keys


# Names users type from Megatron-LM (`--train-iters` -> train_iters), Hugging Face TrainingArguments or habit, and
# megaocto's key for each. Matched on the whole dotted key, then on its last part (`--train.train_iters`,
# `--train_iters`). A key whose last part is a field of exactly one other section (`train.seq_length`,
# `--micro_batch_size`) needs no entry: that field is suggested.
KEY_ALIASES = {
    # Megatron-LM arguments (dashes become underscores)
    "train_iters": "train.iters", "train_samples": "train.samples", "exit_duration_in_mins": "train.exit_duration_mins",
    "seed": "train.seed", "bf16": "train.dtype", "fp16": "train.dtype", "recompute_granularity": "train.recompute",
    "tensor_model_parallel_size": "parallel.tp", "pipeline_model_parallel_size": "parallel.pp",
    "distributed_backend": "parallel.backend", "distributed_timeout_minutes": "parallel.timeout_minutes",
    "lr_decay_style": "schedule.style", "lr_warmup_iters": "schedule.warmup_iters",
    "lr_warmup_fraction": "schedule.warmup_fraction", "lr_decay_iters": "schedule.decay_iters",
    "adam_beta1": "optimizer.beta1", "adam_beta2": "optimizer.beta2", "adam_eps": "optimizer.eps",
    "eval_interval": "eval.interval", "eval_iters": "eval.iters", "tensorboard_dir": "logging.run_dir",
    "wandb_exp_name": "logging.wandb_run_name", "data_path": "data.paths", "train_data_path": "data.paths",
    "valid_data_path": "data.valid_paths", "test_data_path": "data.test_paths", "tokenizer_model": "data.tokenizer",
    "vocab_file": "data.tokenizer", "tokenizer_file": "data.tokenizer", "layernorm_epsilon": "model.norm_epsilon",
    "ffn_size": "model.ffn_hidden_size", "untie_embeddings_and_output_weights": "model.tie_embeddings",
    "num_workers": "data.num_workers", "use_distributed_optimizer": "train.zero1",
    # other common spellings (Hugging Face TrainingArguments, nanoGPT, ...)
    "learning_rate": "optimizer.lr", "max_steps": "train.iters", "max_iters": "train.iters",
    "num_train_epochs": "train.epochs", "per_device_train_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size", "warmup_steps": "schedule.warmup_iters",
    "lr_scheduler_type": "schedule.style", "max_grad_norm": "optimizer.clip_grad", "grad_clip": "optimizer.clip_grad",
    "logging_steps": "logging.log_interval", "save_steps": "checkpoint.save_interval", "tp": "parallel.tp",
    "tp_size": "parallel.tp", "block_size": "model.seq_length", "max_seq_length": "model.seq_length",
}
# Other names a config may use for a key, accepted as that key (Megatron's spelling of an option megaocto has).
ACCEPTED_ALIASES = {"train.use_distributed_optimizer": "train.zero1"}
# Megatron-LM arguments without a megaocto equivalent: what to do instead.
NO_EQUIVALENT = {
    "use_flash_attn": "model.kernels picks the attention kernels (auto: Triton on CUDA)",
    "num_layers_per_virtual_pipeline_stage": "megaocto has no pipeline schedule (parallel.pp must be 1)",
}


def _alias_hint(key: str, candidates: list[str]) -> str | None:
    """The hint for a key typed by another framework's name, or None."""
    leaf = key.rpartition(".")[2]
    if leaf in NO_EQUIVALENT:
        return NO_EQUIVALENT[leaf]
    target = KEY_ALIASES.get(key) or KEY_ALIASES.get(leaf)
    if target in candidates and target != key:
        return f"did you mean {target!r}?"
    sections = {c for c in candidates if "." not in c}
    same_leaf = [c for c in candidates if c.rpartition(".")[2] == leaf and c not in sections and c != key]
    if len(same_leaf) == 1:
        return f"did you mean {same_leaf[0]!r}?"
    return None


def _unknown(key: str, root_cls, where: str) -> ConfigError:
    candidates = _all_keys(root_cls)
    alias = _alias_hint(key, candidates)
    if alias:
        return ConfigError(f"{where}: unknown key {key!r}; {alias}")
    # compare with keys of the same depth first: 'trian.iters' -> 'train.iters', not the section 'train'
    same_depth = [c for c in candidates if c.count(".") == key.count(".")]
    close = difflib.get_close_matches(key, same_depth, n=1, cutoff=0.5) or \
        difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # try matching only the last part within the same section
        section, _, leaf = key.rpartition(".")
        same = [c for c in candidates if c.rpartition(".")[0] == section]
        close = difflib.get_close_matches(key, same, n=1, cutoff=0.0) if same else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _error_origin(message: str, cls, prefix: str, origin: dict[str, str]) -> str:
    """Where to point a validation error of section `prefix`: the line (or flag) of the first field the message
    names (`model.seq_length=...`, then a bare `max_position_embeddings`) that the file or command line set;
    else the section's line."""
    names = [f.name for f in dataclasses.fields(cls)]
    dotted = [m.group(1) for m in re.finditer(r"\b" + re.escape(prefix) + r"(\w+)", message)] if prefix else []
    bare = sorted((m.start(), n) for n in names for m in [re.search(rf"(?<![\w.]){re.escape(n)}\b", message)] if m)
    for name in dotted + [n for _, n in bare]:
        if prefix + name in origin:
            return origin[prefix + name]
    return origin.get(prefix.rstrip("."), "config")


def _build(cls, data: dict, prefix: str, origin: dict[str, str], root_cls) -> Any:
    """Instantiate dataclass `cls` from a nested dict; `origin` maps dotted keys to 'file:line' / 'command line'."""
    if not isinstance(data, dict):
        where = origin.get(prefix.rstrip("."), "config")
        raise ConfigError(f"{where}: {prefix.rstrip('.')!r} must be a section (mapping), got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = dict(data)
    preset = None
    if "preset" in data and "preset" not in names and hasattr(cls, "from_preset"):
        preset = data.pop("preset")
        if preset is _BARE:
            _bare_value(str, origin.get(prefix + "preset", "command line"), prefix + "preset")
    kwargs = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        where = origin.get(dotted) or next((v for k, v in origin.items() if k.startswith(dotted + ".")), "config")
        if key not in names:  # a CLI flag names only its full key (--trian.iters): report and match that
            full = dotted if dotted in origin else next((k for k in origin if k.startswith(dotted + ".")), dotted)
            raise _unknown(full, root_cls, where)
        tp = hints[key]
        if value is _BARE:
            value = _bare_value(tp, where, dotted)
        if _is_dataclass_type(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, dotted + ".", origin, root_cls)
        else:
            kwargs[key] = _convert(value, tp, origin.get(dotted, "").startswith("command line"),
                                   f"{where}: {dotted}")
    try:
        if preset is not None:
            return cls.from_preset(str(preset), **kwargs)
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{_error_origin(str(e), cls, prefix, origin)}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{origin.get(prefix + 'preset', origin.get(prefix.rstrip('.'), 'config'))}: "
                          f"cannot build {prefix.rstrip('.') or cls.__name__}: {e}") from None


def _get_dotted(tree: dict, key: str) -> Any:
    node: Any = tree
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def _read_tree(path: str | None, overrides: list[str] | None,
               follows: dict[str, str] | None = None) -> tuple[dict, dict[str, str]]:
    """(nested dict of the file + CLI overrides, {dotted key: 'file:line' | 'command line --key'}).

    `follows` = {follower: leader} dotted keys: when the FILE sets the follower to the same value as the leader and
    the command line overrides only the leader, the follower takes the leader's new value too (its origin says so).
    """
    tree: dict = {}
    origin: dict[str, str] = {}
    if path is not None:
        tree, lines = read_config_file(path)
        origin = {k: f"{path}:{n}" for k, n in lines.items()}
    tied = [(f, lead) for f, lead in (follows or {}).items()
            if _get_dotted(tree, f) is not None and _get_dotted(tree, f) == _get_dotted(tree, lead)]
    parsed = parse_overrides(overrides or [])
    for key, raw in parsed:
        _set_dotted(tree, key, _BARE if raw is None else raw)
        origin[key] = f"command line --{key}"
    for alias, key in ACCEPTED_ALIASES.items():
        if _get_dotted(tree, alias) is not None:
            if _get_dotted(tree, key) is not None:
                raise ConfigError(f"{origin.get(alias, 'config')}: {alias} is another name for {key}, which is also "
                                  f"set ({origin.get(key, 'config')}); set only one")
            section, _, leaf = alias.rpartition(".")
            _set_dotted(tree, key, _get_dotted(tree, section).pop(leaf))
            origin[key] = f"{origin.get(alias, 'config')} (as {alias})"
    given = {key for key, _ in parsed}
    for follower, leader in tied:
        if leader in given and follower not in given:
            _set_dotted(tree, follower, _get_dotted(tree, leader))
            origin[follower] = f"command line --{leader} ({follower} follows it: {path} sets both the same)"
    return tree, origin


def load_config(cls, path: str | None = None, overrides: list[str] | None = None, *, validate: bool = True,
                follows: dict[str, str] | None = None):
    """Build dataclass `cls` from an optional config file plus CLI override tokens (`follows`: see _read_tree)."""
    tree, origin = _read_tree(path, overrides, follows)
    cfg = _build(cls, tree, "", origin, cls)
    if validate and hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


# A config file whose checkpoint.load equals checkpoint.save (resume from its own checkpoints) keeps that meaning
# when only the save directory is overridden (`SAVE=/x sbatch launch/finetune.sh`, `--checkpoint.save /x`): load
# moves along. An explicit `--checkpoint.load` still wins; a file whose load differs (base weights) is untouched.
RUN_CONFIG_FOLLOWS = {"checkpoint.load": "checkpoint.save"}

# ModelConfig fields that are choices of the run, not of the architecture: use_checkpoint_args never takes these.
RUN_MODEL_FIELDS = ("seq_length", "attention_dropout", "hidden_dropout", "init_method_std", "kernels")


def load_run_config(path: str | None, overrides: list[str] | None = None):
    """The `megaocto train` config: RunConfig from YAML/TOML + `--section.field VALUE` overrides.

    A file's `load == save` follows a `--checkpoint.save` override (RUN_CONFIG_FOLLOWS). With
    checkpoint.use_checkpoint_args (default) and a checkpoint to load, the model architecture comes from that
    checkpoint's metadata.json; model keys given in the file or on the command line win (not model.preset).
    """
    from megaocto.config.train import CheckpointConfig, RunConfig

    tree, origin = _read_tree(path, overrides, RUN_CONFIG_FOLLOWS)
    ckpt_cfg = _build(CheckpointConfig, tree.get("checkpoint") or {}, "checkpoint.", origin, RunConfig)
    saved = checkpoint_model_args(ckpt_cfg) if ckpt_cfg.use_checkpoint_args else None
    if saved:
        model = tree.setdefault("model", {})
        if not isinstance(model, dict):
            raise ConfigError(f"{origin.get('model', 'config')}: 'model' must be a section (mapping), got {model!r}")
        for key, value in saved["model"].items():
            if key not in model and key not in RUN_MODEL_FIELDS:
                model[key] = value
                origin[f"model.{key}"] = f"{saved['where']} (checkpoint.use_checkpoint_args)"
    cfg = _build(RunConfig, tree, "", origin, RunConfig)
    cfg.validate()
    return cfg


def checkpoint_model_args(ckpt_cfg) -> dict | None:
    """{"model": the saved model config, "where": metadata path} of the checkpoint a run will load, or None.

    The same source as the training loop's: the run's own `save` when auto_resume finds a checkpoint there, else
    `load`. None when there is nothing to load or no metadata (a Megatron checkpoint); the loop reports those.
    """
    from megaocto import checkpoint as ckpt  # lazy: config/ imports no torch at import time

    source = None
    if ckpt_cfg.auto_resume and ckpt_cfg.save and ckpt.read_tracker(ckpt_cfg.save) is not None:
        source = ckpt_cfg.save
    elif ckpt_cfg.load and os.path.isdir(ckpt_cfg.load) and ckpt.read_tracker(ckpt_cfg.load) is not None:
        source = ckpt_cfg.load
    if source is None:
        return None
    iteration = ckpt.read_tracker(source)
    meta = ckpt.read_metadata(source, iteration)
    model = ((meta or {}).get("config") or {}).get("model")
    if not isinstance(model, dict):
        return None
    from megaocto.config.model import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    where = os.path.join(ckpt.resolve_dir(source, iteration), ckpt.METADATA)
    return {"model": {k: v for k, v in model.items() if k in known}, "where": where}


def config_to_dict(cfg) -> dict:
    """Plain JSON-able dict of a config dataclass (for checkpoint metadata and W&B)."""
    return dataclasses.asdict(cfg)


def config_docs_markdown(cls, prefix: str = "") -> str:
    """A markdown table (key, default, doc) generated from the dataclass field docs; keys get `prefix`."""
    rows = ["| key | default | description |", "| --- | --- | --- |"]

    def walk(c, prefix):
        docs = field_docs(c)
        h = _hints(c)
        for f in dataclasses.fields(c):
            if _is_dataclass_type(h[f.name]):
                walk(h[f.name], prefix + f.name + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            rows.append(f"| `{prefix}{f.name}` | `{default!r}` | {docs[f.name]} |")

    walk(cls, prefix)
    return "\n".join(rows)


def training_docs_markdown() -> str:
    """The config reference of docs/training.md: one table per training section."""
    from megaocto.config.train import RunConfig

    hints = _hints(RunConfig)
    parts = []
    for name in ("train", "optimizer", "schedule", "checkpoint", "logging", "eval"):
        parts.append(f"### {name}\n\n{config_docs_markdown(hints[name], name + '.')}\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(training_docs_markdown())
