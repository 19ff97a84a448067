"""One configuration object for the whole suite, validated in one place.

`Config` holds the model, data and training settings shared by both models. Presets:

- ``paper``: the study's CONFIG verbatim (GPT-2 BPE, 512-wide, 8 layers, context 256, ...).
- ``small``: the same architecture shrunk for a CPU run on the real corpus in minutes.
- ``smoke``: a tiny model with which the four notebooks run end to end on 2 CPU cores.

Values are overridden with ``make_config("paper", batch_size=16)`` or, from the command line
and papermill, with ``parse_overrides(["batch_size=16", "dtype=float16"])``.
"""
from __future__ import annotations

import ast
import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

from .errors import SuiteError


class ConfigError(SuiteError, ValueError):
    """An inconsistent or unknown setting; the message names it and the fix."""


@dataclass
class Config:
    # --- tokenizer / model shape ---
    vocab_size: int = 50257
    emb_dim: int = 512
    context_length: int = 256
    n_layers: int = 8
    n_heads: int = 8
    head_dim: int = 64
    hidden_dim: int = 2048            # GPT-2 feed-forward width
    n_kv_groups: int = 4              # GQA: key/value heads shared by n_heads // n_kv_groups queries
    qk_norm: bool = True
    rope_base: float = 10000.0
    num_experts: int = 4
    num_experts_per_token: int = 2
    moe_intermediate_size: int = 1024
    # Dense-GQA's feed-forward width; 0: num_experts_per_token x moe_intermediate_size, the work an
    # MoE token gets (the same active parameters). num_experts x moe_intermediate_size matches the
    # MoE's total parameters instead.
    dense_ff_width: int = 0
    bias: bool = False                # biases of the linear layers (norms keep their own)
    drop_rate: float = 0.0
    # Tied by default, as in GPT-2 and the small Qwen3 models: an untied head would add
    # vocab_size * emb_dim = 25.7 M parameters (half of GPT-2's body at the paper preset).
    tie_embeddings: bool = True
    norm_eps: float = 1e-5            # LayerNorm (GPT-2) and RMSNorm (MoE-GQA)
    aux_loss_coef: float = 0.01       # Switch/GShard load-balancing loss; 0 turns it off

    # --- data ---
    batch_size: int = 8
    stride: int = 128
    num_workers: int = 0
    split_method: str = "proportional"   # or "documents": no document in two splits
    split_ratios: tuple = (0.8, 0.1, 0.1)

    # --- training ---
    max_epochs: int = 2
    max_steps: int = 0                # 0 = no cap; else stop after this many optimizer steps
    lr: float = 4e-4
    min_lr_ratio: float = 0.1         # cosine decays to lr * min_lr_ratio
    lr_schedule: str = "cosine"       # "cosine" (with warm-up) or "constant"
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0            # 0 disables clipping
    dtype: str = "bfloat16"           # requested; the device decides what actually runs
    force_dtype: bool = False         # insist on `dtype` even where it is emulated (CPU bf16 or fp16)
    device: str = "cuda"              # "cuda", "cpu" or "auto"
    compile: bool = False             # torch.compile, where Triton supports the GPU
    eval_freq: int = 100
    eval_iter: int = 16               # each evaluation point reads eval_iter x batch_size windows per split
    # "sampled": windows spread over each split, the same for every model and seed (evaluation.py);
    # "study": the study's first eval_iter batches of each split, and the whole test split.
    eval_protocol: str = "sampled"
    eval_seed: int = 2024             # chooses the evaluation windows; independent of `seed`
    test_windows: int = 0             # 0 = the whole test split (the study); else N windows spread over it
    log_every: int = 10               # progress bar and finiteness check interval
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    seed: int = 123

    # --- generation samples ---
    sample_max_new_tokens: int = 50

    # --- tracking ---
    wandb_mode: str = "offline"       # "online", "offline" or "disabled"; WANDB_MODE wins if set
    wandb_project: str = "llm-pt-literature"
    wandb_log_checkpoints: bool = False

    preset: str = field(default="custom", compare=False)

    def __post_init__(self):
        if isinstance(self.split_ratios, list):       # as to_dict() and JSON give it back
            self.split_ratios = tuple(self.split_ratios)
        validate(self)

    # Settings that change the model's tensors: a checkpoint can only be resumed into these.
    MODEL_KEYS = ("vocab_size", "emb_dim", "context_length", "n_layers", "n_heads", "head_dim",
                  "hidden_dim", "n_kv_groups", "qk_norm", "num_experts", "num_experts_per_token",
                  "moe_intermediate_size", "dense_ff_width", "bias", "tie_embeddings")

    # --- the one serialised form: a dict of every setting (JSON in files, on command lines) ---
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["split_ratios"] = list(self.split_ratios)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Config":
        """Back from `to_dict()`: a checkpoint's, a metrics file's or a command line's settings."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(_unknown_keys_message(unknown))
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))

    @property
    def dense_width(self) -> int:
        """Dense-GQA's feed-forward width (see dense_ff_width)."""
        return self.dense_ff_width or self.num_experts_per_token * self.moe_intermediate_size

    def replace(self, **changes) -> "Config":
        d = self.to_dict()
        unknown = sorted(set(changes) - set(d))
        if unknown:
            raise ConfigError(_unknown_keys_message(unknown))
        d.update(changes)
        return Config(**d)


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},  # the dataclass defaults are the study's CONFIG
    "small": dict(emb_dim=256, n_layers=4, n_heads=4, head_dim=64, hidden_dim=1024,
                  n_kv_groups=2, moe_intermediate_size=512, context_length=128, stride=128,
                  batch_size=8, max_steps=300, eval_freq=50, eval_iter=8, warmup_steps=30,
                  lr=1e-3, dtype="float32", device="auto", checkpoint_every=1000, test_windows=1024),
    "smoke": dict(emb_dim=64, n_layers=2, n_heads=4, head_dim=16, hidden_dim=256,
                  n_kv_groups=2, moe_intermediate_size=128, context_length=32, stride=32,
                  batch_size=4, max_epochs=1, max_steps=30, eval_freq=10, eval_iter=2,
                  warmup_steps=5, lr=2e-3, dtype="float32", device="auto",
                  checkpoint_every=15, sample_max_new_tokens=12, log_every=5, test_windows=128),
}


def _unknown_keys_message(unknown: Iterable[str]) -> str:
    known = ", ".join(f.name for f in fields(Config))
    return f"unknown setting(s) {', '.join(unknown)}. Known settings: {known}."


def make_config(preset: str = "paper", overrides: Mapping[str, Any] | None = None, **kw) -> Config:
    """The named preset with `overrides` (a dict, e.g. from a papermill parameter) and `kw` applied."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    values = {**PRESETS[preset], **dict(overrides or {}), **kw}
    unknown = sorted(set(values) - {f.name for f in fields(Config)})
    if unknown:
        raise ConfigError(_unknown_keys_message(unknown))
    values = {k: _coerce(k, v) for k, v in values.items()}
    return Config(preset=preset, **values)


def resolve_preset(preset: str) -> tuple[str, str]:
    """`auto` becomes `paper` where a CUDA GPU is usable, else `small`; (preset, why it was chosen)."""
    if preset != "auto":
        return preset, "asked for"
    from .device import default_preset      # torch's CUDA probe, only when asked
    chosen, why = default_preset()
    return chosen, f"auto: {why}"


def config_arguments(parser, default_preset: str = "auto", seed_help: str = "the preset's seed (123) unless given",
                     steps_help: str = "cap on training steps (0: the preset's value)") -> None:
    """The flags every command line takes for its settings; read them back with `config_from_arguments`."""
    parser.add_argument("--preset", default=default_preset, choices=["auto", *sorted(PRESETS)],
                        help="auto: paper where a CUDA GPU is usable, else small; paper: the study's "
                             "configuration (GPU); small: a CPU run of about a quarter of an hour; smoke: tests")
    parser.add_argument("--seed", type=int, default=None, help=seed_help)
    parser.add_argument("--max-steps", type=int, default=0, help=steps_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any setting, e.g. --set batch_size=16 --set dtype=float16 (repeatable)")


def config_from_arguments(args) -> tuple[str, str, dict[str, Any], "Config"]:
    """(preset, why it was chosen, the --set settings, the validated Config) from `config_arguments`'
    flags, and --split-method where a command has it. Only the flags given count: a flag's default
    never wins over the same setting in --set."""
    preset, why = resolve_preset(args.preset)
    overrides = parse_overrides(args.set)
    flags = {"seed": args.seed, "max_steps": args.max_steps or None, "split_method": getattr(args, "split_method", None)}
    return preset, why, overrides, make_config(preset, {**overrides, **{k: v for k, v in flags.items() if v is not None}})


def _coerce(key: str, value: Any) -> Any:
    """Turn strings from a command line into the field's type; reject what cannot convert.
    Values of other types pass through unchanged: `validate` checks them."""
    ftype = {f.name: f.type for f in fields(Config)}[key]
    if ftype == "tuple" and isinstance(value, list):
        return tuple(value)
    if not isinstance(value, str) or ftype == "str":
        return value
    try:
        if ftype == "bool":
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if ftype == "int":
            return int(value)
        if ftype == "float":
            return float(value)
        parsed = ast.literal_eval(value)
        return tuple(parsed) if isinstance(parsed, (list, tuple)) else parsed
    except (ValueError, SyntaxError, TypeError):
        raise ConfigError(f"setting {key}={value!r}: expected {_TYPE_WORDS[ftype]}.") from None


def parse_overrides_value(overrides: Any) -> dict[str, Any]:
    """A notebook's `overrides` parameter: a mapping, or its JSON / YAML text (papermill's `-p`
    passes a string), or empty."""
    if overrides is None or overrides == "":
        return {}
    if isinstance(overrides, str):
        import yaml   # papermill's own dependency; JSON is YAML too
        try:
            overrides = yaml.safe_load(overrides)
        except yaml.YAMLError as e:
            raise ConfigError(f"overrides {overrides!r} is neither JSON nor YAML ({str(e).splitlines()[0]}). "
                              'Fix: e.g. overrides=\'{"batch_size": 16}\'') from None
        overrides = overrides or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides must be a mapping of settings, e.g. {{\"batch_size\": 16}} (got "
                          f"{type(overrides).__name__} {overrides!r})")
    return dict(overrides)


def changed_settings(cfg: Config | Mapping[str, Any]) -> dict[str, Any]:
    """The settings of `cfg` (a Config or its to_dict()) that differ from its preset."""
    values = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    defaults = make_config(values["preset"]).to_dict() if values.get("preset") in PRESETS else Config().to_dict()
    return {k: v for k, v in values.items() if k != "preset" and defaults.get(k) != v}


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """["batch_size=16", "dtype=float16"] -> {"batch_size": "16", "dtype": "float16"}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. batch_size=16.")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


_TYPE_WORDS = {"tuple": "a tuple of numbers", "int": "an integer", "float": "a number", "bool": "True or False",
               "str": "a string"}


def _type_errors(cfg: Config) -> list[str]:
    """Each setting against its declared type (a bool is not an int, an int is a fine float)."""
    errors = []
    for f in fields(Config):
        v = getattr(cfg, f.name)
        ok = {"int": isinstance(v, int) and not isinstance(v, bool),
              "float": isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": isinstance(v, bool),
              "str": isinstance(v, str),
              "tuple": isinstance(v, (tuple, list)) and all(
                  isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)}[f.type]
        if not ok:
            errors.append(f"{f.name} must be {_TYPE_WORDS[f.type]} (got {type(v).__name__} {v!r})")
    return errors


def validate(cfg: Config) -> None:
    """Every consistency rule of the configuration, checked before any work starts."""
    errors = _type_errors(cfg)
    if errors:
        raise ConfigError("invalid configuration: " + "; ".join(errors))
    positive = ["vocab_size", "emb_dim", "context_length", "n_layers", "n_heads", "head_dim",
                "hidden_dim", "n_kv_groups", "num_experts", "num_experts_per_token",
                "moe_intermediate_size", "batch_size", "stride", "max_epochs", "eval_freq",
                "eval_iter", "checkpoint_every", "keep_checkpoints", "log_every",
                "sample_max_new_tokens"]
    for name in positive:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            errors.append(f"{name} must be a positive integer (got {v!r})")
    for name in ("max_steps", "warmup_steps", "num_workers", "test_windows", "dense_ff_width"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 0:
            errors.append(f"{name} must be an integer >= 0 (got {v!r})")
    if not errors:
        if cfg.n_heads % cfg.n_kv_groups:
            errors.append(f"n_heads ({cfg.n_heads}) must be divisible by n_kv_groups "
                          f"({cfg.n_kv_groups})")
        if cfg.num_experts_per_token > cfg.num_experts:
            errors.append(f"num_experts_per_token ({cfg.num_experts_per_token}) cannot exceed "
                          f"num_experts ({cfg.num_experts})")
        if cfg.stride > cfg.context_length:
            errors.append(f"stride ({cfg.stride}) > context_length ({cfg.context_length}) would "
                          "skip tokens; use stride <= context_length")
        if cfg.head_dim % 2:
            errors.append(f"head_dim ({cfg.head_dim}) must be even for rotary embeddings")
        if cfg.vocab_size > 65536:
            errors.append(f"vocab_size ({cfg.vocab_size}) does not fit the uint16 token files")
    for name in ("lr", "rope_base", "norm_eps"):
        if not getattr(cfg, name) > 0:
            errors.append(f"{name} must be > 0 (got {getattr(cfg, name)!r})")
    if not 0 <= cfg.drop_rate < 1:
        errors.append(f"drop_rate must be in [0, 1) (got {cfg.drop_rate!r})")
    if not 0 <= cfg.min_lr_ratio <= 1:
        errors.append(f"min_lr_ratio must be in [0, 1] (got {cfg.min_lr_ratio!r})")
    for name in ("weight_decay", "grad_clip", "aux_loss_coef"):
        if getattr(cfg, name) < 0:
            errors.append(f"{name} must be >= 0 (got {getattr(cfg, name)!r})")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        errors.append(f"beta1/beta2 must be in [0, 1) (got {cfg.beta1}, {cfg.beta2})")
    choices = {"dtype": ("float32", "bfloat16", "float16"), "device": ("cuda", "cpu", "auto"),
               "split_method": ("proportional", "documents"), "lr_schedule": ("cosine", "constant"),
               "wandb_mode": ("online", "offline", "disabled"), "eval_protocol": ("sampled", "study")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            errors.append(f"{name} must be one of {', '.join(allowed)} (got {getattr(cfg, name)!r})")
    ratios = tuple(cfg.split_ratios)
    if len(ratios) != 3 or any(r <= 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        errors.append(f"split_ratios must be three positive fractions summing to 1 (got {ratios})")
    if errors:
        raise ConfigError("invalid configuration: " + "; ".join(errors))
