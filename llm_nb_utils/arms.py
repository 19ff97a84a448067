"""The arms of the comparison, in one place.

Each arm is one model the suite trains and compares: its name in files and settings, its label in
tables and figures, its colour, the notebook that trains it, the class that builds it and the
transformers class it exports to. Reports, figures, Table 2, export, the pipeline and the sweep read
this table, so a new arm is one entry here (plus its model class and its export mapping).

The three arms decompose the study's comparison. GPT-2 -> Dense-GQA changes the architecture (RoPE,
RMSNorm, SwiGLU, grouped-query attention, QK-norm) at about the same active parameters;
Dense-GQA -> MoE-GQA adds only the routed experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Config, ConfigError
from .gpt2 import GPT2Model
from .qwen3 import DenseGQAModel, MoEGQAModel


@dataclass(frozen=True)
class Arm:
    name: str            # in files, settings and metrics
    label: str           # in tables and figures
    colour: str          # the same in every figure
    notebook: str        # the notebook that trains it
    model_class: type
    hf_class: str        # the transformers class its export loads as
    marker: str          # in scatter plots
    has_experts: bool    # routed experts: the MoE settings apply, expert statistics are kept
    attention: str       # "mha" (a key/value head per query head) or "gqa" (n_kv_groups of them)
    study: dict | None = None    # the study's Table 2 for this arm (two epochs of `paper` on a P100), if it has one


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("gpt2", "GPT-2 baseline", "tab:blue", "02_gpt2_baseline", GPT2Model, "GPT2LMHeadModel", "s", False, "mha",
        study={"test_loss": 3.2699, "test_perplexity": 26.31, "train_time_s": 3882, "peak_memory_mb": 3243,
               "tokens_per_s": 13347}),
    Arm("dense_gqa", "Dense-GQA", "tab:green", "03_dense_gqa", DenseGQAModel, "Qwen3ForCausalLM", "D", False,
        "gqa"),
    Arm("moe_gqa", "MoE-GQA", "tab:orange", "04_moe_gqa", MoEGQAModel, "Qwen3MoeForCausalLM", "o", True, "gqa",
        study={"test_loss": 3.2127, "test_perplexity": 24.85, "train_time_s": 3623, "peak_memory_mb": 2823,
               "tokens_per_s": 8648}),
)}
ARM_NAMES = tuple(ARMS)
REFERENCE = ARM_NAMES[0]        # the study's baseline: variations are measured from it
STUDY_ARMS = tuple(n for n in ARM_NAMES if ARMS[n].study)     # the two the study compared
# The two steps that decompose reference -> last arm: (from, to, what the step changes).
STEPS = ((ARM_NAMES[0], ARM_NAMES[1], "the architecture"), (ARM_NAMES[1], ARM_NAMES[2], "the experts"))


def arm(name: str) -> Arm:
    if name not in ARMS:
        raise ConfigError(f"unknown arm {name!r}; the arms are {', '.join(ARM_NAMES)}")
    return ARMS[name]


def parse_arms(names) -> tuple[str, ...]:
    """A choice of arms (names, a comma-separated string, or "all"), checked and in registry order."""
    if names in (None, "", "all") or names == ["all"]:
        return ARM_NAMES
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    chosen = {arm(n).name for n in names}
    return tuple(n for n in ARM_NAMES if n in chosen)


def label(name: str) -> str:
    return ARMS[name].label if name in ARMS else name


def build_model(name: str, cfg: Config) -> torch.nn.Module:
    """Arm `name` with GPT-2 initialisation, seeded by `cfg.seed`."""
    cls = arm(name).model_class
    torch.manual_seed(cfg.seed)
    return cls(cfg)


def notebook_arm(notebook: str) -> str | None:
    """The arm a training notebook trains, or None for the other notebooks."""
    return next((a.name for a in ARMS.values() if a.notebook == notebook), None)
