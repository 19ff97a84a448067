"""One registry of arms: every module asks it, none lists the arms itself."""
import ast

import pytest

from llm_nb_utils.arms import ARM_NAMES, ARMS, build_model, notebook_arm, parse_arms
from llm_nb_utils.config import ConfigError, make_config
from llm_nb_utils.env import NOTEBOOK_DIR, REPO


def test_no_module_outside_the_registry_names_an_arm():
    """A fourth arm should touch one file: so no string literal in the package (docstrings aside) is
    an arm's name, and no module other than the registry spells out an arm's notebook."""
    offenders = []
    for path in sorted((REPO / "llm_nb_utils").glob("*.py")):
        if path.name == "arms.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value in ARM_NAMES or node.value in {a.notebook for a in ARMS.values()}:
                    offenders.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_every_arm_has_its_notebook_and_builds():
    cfg = make_config("smoke", device="cpu")
    for name, arm in ARMS.items():
        assert (NOTEBOOK_DIR / f"{arm.notebook}.ipynb").exists(), name
        assert notebook_arm(arm.notebook) == name
        assert isinstance(build_model(name, cfg), arm.model_class)
    assert notebook_arm("01_data_prep") is None


def test_a_choice_of_arms_is_checked_and_ordered():
    assert parse_arms("all") == ARM_NAMES and parse_arms(None) == ARM_NAMES
    assert parse_arms("moe_gqa,gpt2") == ("gpt2", "moe_gqa")
    assert parse_arms(["moe_gqa", "dense_gqa"]) == ("dense_gqa", "moe_gqa")
    with pytest.raises(ConfigError, match="unknown arm 'mamba'; the arms are gpt2, dense_gqa, moe_gqa"):
        parse_arms("gpt2,mamba")
