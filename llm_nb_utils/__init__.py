"""Shared package of the notebook suite: GPT-2 vs MoE-GQA trained from scratch on Portuguese literature.

Modules, one job each: `config` (settings and presets), `tokenizer` (GPT-2 BPE), `corpus` and
`gutenberg` (text sources), `prepare` (token files), `data` (windows, loaders, Table 1), `layers`,
`attention`, `moe`, `models` (the two architectures), `accounting`, `generate`, `device`,
`checkpoint`, `tracking`, `train` (the engine), `report` (Table 2, figures), `pipeline` (papermill).
"""
__version__ = "0.1.0"
