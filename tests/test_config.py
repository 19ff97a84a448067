import pytest

from llm_nb_utils.config import Config, ConfigError, make_config, parse_overrides


def test_paper_preset_is_the_study_config():
    c = make_config("paper")
    expected = dict(vocab_size=50257, emb_dim=512, context_length=256, n_layers=8, n_heads=8,
                    head_dim=64, hidden_dim=2048, n_kv_groups=4, qk_norm=True, rope_base=10000.0,
                    num_experts=4, num_experts_per_token=2, moe_intermediate_size=1024, bias=False,
                    batch_size=8, max_epochs=2, num_workers=0, stride=128, dtype="bfloat16",
                    device="cuda", eval_freq=100, eval_iter=16, checkpoint_every=5000)
    assert {k: getattr(c, k) for k in expected} == expected


def test_overrides_from_strings_are_typed():
    c = make_config("smoke", parse_overrides(["batch_size=16", "qk_norm=false", "lr=1e-3", "dtype=float16"]))
    assert (c.batch_size, c.qk_norm, c.lr, c.dtype) == (16, False, 1e-3, "float16")


@pytest.mark.parametrize("changes, fragment", [
    (dict(n_heads=8, n_kv_groups=3), "divisible by n_kv_groups"),
    (dict(num_experts=2, num_experts_per_token=3), "cannot exceed num_experts"),
    (dict(stride=512), "stride (512) > context_length"),
    (dict(emb_dim=0), "emb_dim must be a positive integer"),
    (dict(batch_size=-1), "batch_size must be a positive integer"),
    (dict(dtype="float8"), "dtype must be one of"),
    (dict(split_ratios=(0.5, 0.2, 0.2)), "split_ratios"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio must be in [0, 1]"),
    (dict(drop_rate=1.0), "drop_rate must be in [0, 1)"),
])
def test_inconsistent_values_are_rejected(changes, fragment):
    with pytest.raises(ConfigError) as e:
        make_config("paper", changes)
    assert fragment in str(e.value)


def test_unknown_key_and_preset_and_bad_types():
    with pytest.raises(ConfigError, match="unknown setting.*n_layer\\b"):
        make_config("paper", {"n_layer": 4})
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        make_config("huge")
    with pytest.raises(ConfigError, match="batch_size='eight'"):
        make_config("paper", {"batch_size": "eight"})
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["batch_size"])


def test_replace_validates_again():
    c = make_config("smoke")
    assert c.replace(batch_size=2).batch_size == 2
    with pytest.raises(ConfigError):
        c.replace(n_kv_groups=3)
    with pytest.raises(ConfigError):
        Config(n_heads=6)


def test_changed_settings_lists_only_differences_from_the_preset():
    from llm_nb_utils.config import changed_settings
    c = make_config("smoke", {"batch_size": 2, "seed": 123})        # seed 123 is the preset's value
    assert changed_settings(c) == {"batch_size": 2}
    assert changed_settings(c.to_dict()) == {"batch_size": 2}
    assert changed_settings(make_config("paper")) == {}
