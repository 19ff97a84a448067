"""The run folder owns the layout; checkpoints and settings travel in one form each."""
import pytest
import torch

from llm_nb_utils.arms import build_model
from llm_nb_utils.checkpoint import load_checkpoint, save_checkpoint
from llm_nb_utils.config import Config, ConfigError, make_config
from llm_nb_utils.errors import SuiteError
from llm_nb_utils.runfolder import MissingRunFile, RunFolder


def test_the_layout_is_written_in_one_place(tmp_path):
    f = RunFolder(tmp_path)
    assert f.data == tmp_path / "data" and f.figures == tmp_path / "figures"
    assert f.checkpoints("gpt2") == tmp_path / "checkpoints" / "gpt2"
    assert f.metrics_path("moe_gqa") == tmp_path / "metrics" / "moe_gqa.json"
    assert f.trained_arms() == []
    f.write_metrics({"model": "dense_gqa", "test_loss": 5.0, "samples": [{"prompt": "lisboa"}]})
    f.write_metrics({"model": "gpt2", "test_loss": 5.1, "samples": []})
    assert f.trained_arms() == ["gpt2", "dense_gqa"]          # the registry's order, not the files'
    assert f.load_metrics("dense_gqa") == {"model": "dense_gqa", "test_loss": 5.0, "samples": [{"prompt": "lisboa"}]}


def test_what_is_missing_is_named_with_the_step_that_writes_it(tmp_path):
    f = RunFolder(tmp_path)
    with pytest.raises(MissingRunFile, match="no metrics for moe_gqa .* Fix: run notebook 04_moe_gqa"):
        f.load_metrics("moe_gqa")
    with pytest.raises(MissingRunFile, match="no checkpoint of gpt2 .* Fix: train it first .*02_gpt2_baseline"):
        f.load_trained_model("gpt2")
    assert issubclass(MissingRunFile, SuiteError) and issubclass(MissingRunFile, FileNotFoundError)


def test_a_trained_model_comes_back_from_its_checkpoint_with_its_own_settings(tmp_path):
    cfg = make_config("smoke", device="cpu", seed=7)
    model = build_model("moe_gqa", cfg)
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "model_name": "moe_gqa"},
                    RunFolder(tmp_path).checkpoints("moe_gqa"), step=30)
    back = RunFolder(tmp_path).load_trained_model("moe_gqa")
    assert not back.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_a_checkpoint_written_before_the_experts_had_a_module_still_loads(tmp_path):
    """Older checkpoints name the experts' weights blocks.N.moe.w_gate (now blocks.N.moe.experts.w_gate)."""
    cfg = make_config("smoke", device="cpu")
    model = build_model("moe_gqa", cfg)
    old = {k.replace(".moe.experts.", ".moe."): v for k, v in model.state_dict().items()}
    assert "blocks.0.moe.w_gate" in old
    path = save_checkpoint({"model": old, "config": cfg.to_dict(), "model_name": "moe_gqa"}, tmp_path, step=1)
    fresh = build_model("moe_gqa", cfg.replace(seed=cfg.seed + 1))
    fresh.load_state_dict(load_checkpoint(path)["model"])
    assert torch.equal(fresh.blocks[1].moe.experts.w_down, model.blocks[1].moe.experts.w_down)


def test_settings_have_one_serialised_form():
    cfg = make_config("small", seed=5, batch_size=4)
    assert Config.from_json(cfg.to_json()) == cfg
    assert Config.from_dict(cfg.to_dict()).split_ratios == cfg.split_ratios
    with pytest.raises(ConfigError, match="unknown setting.*n_layer\\b"):
        Config.from_dict({**cfg.to_dict(), "n_layer": 3})


def test_machine_paths_are_left_out_of_kept_files(tmp_path):
    from llm_nb_utils.files import repository_of, without_machine_paths
    repo = tmp_path / "clone"
    (repo / ".git").mkdir(parents=True)
    run = repo / "docs" / "run"
    run.mkdir(parents=True)
    log = run / "output.log"
    log.write_text(f"llm_nb_utils from {tmp_path}/pkg/llm_nb_utils\nrun directory {run}/metrics\n{tmp_path}/other\n")
    assert repository_of(run) == repo
    without_machine_paths([log, run / "missing.ipynb"], [tmp_path / "pkg", repository_of(run)])
    assert log.read_text() == f"llm_nb_utils from llm_nb_utils\nrun directory docs/run/metrics\n{tmp_path}/other\n"
