"""The notebooks' from-scratch cells check the package: they pass on the package as it is, and each
fails, at its own assert, when the package path it checks computes something else."""
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llm_nb_utils.arms import build_model

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def scratch_cells(notebook: str, prefix: str) -> list[tuple[str, str]]:
    cells = json.loads((NOTEBOOKS / notebook).read_text())["cells"]
    return [(c["id"], "".join(c["source"])) for c in cells
            if c["cell_type"] == "code" and c.get("id", "").startswith(prefix)]


def run_cells(cells, namespace) -> str | None:
    """Executes the cells in order as the notebook would; the id of the cell whose assert fails, or None."""
    for cell_id, source in cells:
        try:
            exec(compile(source, cell_id, "exec"), namespace)
        except AssertionError:
            return cell_id
    return None


def nudged(module: torch.nn.Module, how=lambda out: out * 1.01):
    """The module's forward, its output changed a little: a package path that no longer computes the formula."""
    forward = module.forward
    module.forward = lambda *a, **k: how(forward(*a, **k))


def gpt2_namespace(cfg):
    return {"run": SimpleNamespace(cfg=cfg), "model": build_model("gpt2", cfg), "print": lambda *a, **k: None}


def moe_namespace(cfg):
    return {"run": SimpleNamespace(cfg=cfg), "models": {"moe_gqa": build_model("moe_gqa", cfg)},
            "print": lambda *a, **k: None}


def test_the_from_scratch_cells_agree_with_the_package(smoke_cfg):
    assert run_cells(scratch_cells("02_gpt2_baseline.ipynb", "nb02-scratch"), gpt2_namespace(smoke_cfg)) is None
    assert run_cells(scratch_cells("04_moe_gqa.ipynb", "nb04-scratch"), moe_namespace(smoke_cfg)) is None


@pytest.mark.parametrize("part, fails_at", [("attention", "nb02-scratch-attn2"), ("layernorm", "nb02-scratch-rest"),
                                            ("mlp", "nb02-scratch-rest"), ("loss", "nb02-scratch-loss"),
                                            ("positions", "nb02-scratch-pos"), ("zero positions", "nb02-scratch-swap")])
def test_a_gpt2_cell_fails_when_the_package_disagrees(smoke_cfg, part, fails_at):
    ns = gpt2_namespace(smoke_cfg)
    model = ns["model"]
    block = model.blocks[0]
    if part == "zero positions":                               # no position rows: the swap cell sees no order
        with torch.no_grad():
            model.pos_emb.weight.zero_()
    elif part == "loss":
        nudged(model, lambda out: dataclasses.replace(out, loss=out.loss + 0.01) if out.loss is not None else out)
    else:
        nudged({"attention": block.attn, "layernorm": block.norm1, "mlp": block.ff, "positions": model.pos_emb}[part])
    assert run_cells(scratch_cells("02_gpt2_baseline.ipynb", "nb02-scratch"), ns) == fails_at


@pytest.mark.parametrize("part, fails_at", [("rmsnorm", "nb04-scratch-norm"), ("rope", "nb04-scratch-rope"),
                                            ("gqa", "nb04-scratch-gqa2"), ("experts", "nb04-scratch-moe2"),
                                            ("balancing", "nb04-scratch-moe2")])
def test_an_moe_gqa_cell_fails_when_the_package_disagrees(smoke_cfg, monkeypatch, part, fails_at):
    ns = moe_namespace(smoke_cfg)
    block = ns["models"]["moe_gqa"].blocks[0]
    if part == "rope":
        from llm_nb_utils import layers
        rope = layers.apply_rope
        monkeypatch.setattr(layers, "apply_rope", lambda x, cos, sin: rope(x, cos, sin) * 1.01)
    elif part == "balancing":
        from llm_nb_utils import moe
        loss = moe.balancing_loss
        monkeypatch.setattr(moe, "balancing_loss", lambda routings: loss(routings) * 1.01)
    elif part == "experts":
        nudged(block.moe, lambda out: (out[0] * 1.01, out[1]))
    else:
        nudged({"rmsnorm": block.norm1, "gqa": block.attn}[part])
    assert run_cells(scratch_cells("04_moe_gqa.ipynb", "nb04-scratch"), ns) == fails_at


def test_the_rope_cell_sees_a_score_that_depends_on_where_not_how_far(smoke_cfg):
    cells = scratch_cells("04_moe_gqa.ipynb", "nb04-scratch")
    at = [i for i, (cell_id, _) in enumerate(cells) if cell_id == "nb04-scratch-rope2"][0]
    ns = moe_namespace(smoke_cfg)
    assert run_cells(cells[:at], ns) is None
    ns["apply_rope"] = lambda x, cos, sin: x * (1 + cos)       # scales by position, rotates nothing
    assert run_cells(cells[at:at + 1], ns) == "nb04-scratch-rope2"
