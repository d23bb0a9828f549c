import dataclasses

import pytest

from ditctl.config import (SECTIONS, Config, ConfigError, activate_keys, build_config, load_config,
                           render_template)
from ditctl.scaffold import templates_dir


def test_defaults_follow_the_guide():
    c = build_config({})
    assert c.train.train_batch_size == 1 and c.train.eval_batch_size == 1
    assert c.train.num_epochs == 1 and c.train.max_steps is None
    assert c.train.learning_rate == 1e-4 and c.train.weight_decay == 0.01
    assert c.train.lr_scheduler == "linear" and c.train.num_warmup_steps == 0
    assert c.train.max_grad_norm == 1.0 and c.train.report_to == "tensorboard"
    assert c.train.project_name == "dit-finetune"
    assert c.train.sample_every == 500 and c.train.eval_every == 500
    assert c.train.batch_multiplicity == 1
    assert c.lora.lora_rank == 64 and c.lora.lora_alpha == 64 and c.lora.lora_dropout == 0.0
    assert c.lora.lora_target_modules == ()  # the family's default targets (its lora_targets)
    assert c.data.image_column == "image_path" and c.data.caption_column == "caption"


GUIDE_KEYS = """pretrained_model_path train_data_path val_data_path base_image_dir output_dir
image_column caption_column resolution center_crop random_flip use_resolution_buckets
train_batch_size eval_batch_size num_epochs max_steps gradient_accumulation_steps learning_rate
weight_decay lr_scheduler num_warmup_steps use_8bit_adam use_lora train_only_lora lora_rank
lora_alpha lora_dropout lora_target_modules lora_checkpoint sample_every eval_every
sample_prompts_file batch_multiplicity gradient_checkpointing mixed_precision max_grad_norm seed
report_to project_name use_precomputed_data precomputed_data_dir""".split()


def test_every_guide_flag_is_a_config_key():
    keys = {f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    assert set(GUIDE_KEYS) <= keys


def test_all_errors_reported_at_once_with_location():
    raw = {"train": {"learnig_rate": 1e-4, "train_batch_size": "4", "lr_scheduler": "step"},
           "data": {"resolution": 500}, "traing": {}}
    with pytest.raises(ConfigError) as err:
        build_config(raw, {"train.num_epochs": 0}, source="p.toml")
    text = str(err.value)
    assert "6 configuration problems" in text
    assert "p.toml [train]: unknown key 'learnig_rate'; did you mean 'learning_rate'?" in text
    assert "p.toml [train] train_batch_size = '4': expected an integer" in text
    assert "lr_scheduler = 'step': must be one of 'linear', 'cosine', 'constant'" in text
    assert "resolution = 500: must be a multiple of 16" in text
    assert "unknown section [traing]; did you mean 'train'?" in text
    assert "--num-epochs = 0: must be >= 1" in text


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "learning_rate", 0.0, "must be > 0"),
    ("train", "learning_rate", True, "expected a number"),
    ("lora", "lora_dropout", 1.5, "must be <= 1"),
    ("train", "mixed_precision", "fp8", "must be one of"),
    ("eval", "timestep_quantiles", [0.5, 1.0], "strictly between 0 and 1"),
    ("data", "center_crop", "yes", "expected true or false"),
])
def test_type_and_range_errors(section, key, value, message):
    with pytest.raises(ConfigError, match=message):
        build_config({section: {key: value}})


def test_precedence_flag_over_file_over_default(tmp_path):
    path = tmp_path / "project.toml"
    path.write_text("[train]\nlearning_rate = 2e-5\nnum_epochs = 3\n")
    c = load_config(path, {"train.num_epochs": 7})
    assert c.train.learning_rate == 2e-5      # file over default
    assert c.train.num_epochs == 7            # flag over file
    assert c.train.train_batch_size == 1      # default


def test_comma_separated_lists_and_cross_checks():
    c = build_config({"lora": {"lora_target_modules": "qkv, proj", "use_lora": True,
                               "train_only_lora": True}})
    assert c.lora.lora_target_modules == ("qkv", "proj")
    with pytest.raises(ConfigError, match="train_only_lora = true needs use_lora"):
        build_config({"lora": {"train_only_lora": True}})


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "project.toml"
    path.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_shipped_template_lists_every_key_and_is_in_sync():
    text = (templates_dir() / "project.toml").read_text()
    assert text == render_template(), "regenerate templates/project.toml from render_template()"
    for name, cls in SECTIONS.items():
        assert f"[{name}]" in text
        for f in dataclasses.fields(cls):
            assert f"# {f.name} =" in text


def test_template_with_activated_keys_loads_back(tmp_path):
    text = activate_keys(render_template(), {"model": {"pretrained_model_path": "m"},
                                             "data": {"resolution": 64}})
    path = tmp_path / "project.toml"
    path.write_text(text)
    c = load_config(path)
    assert c.model.pretrained_model_path == "m" and c.data.resolution == 64
    assert c == build_config({"model": {"pretrained_model_path": "m"}, "data": {"resolution": 64}})


def test_hash_changes_with_values():
    a, b = Config(), build_config({"train": {"learning_rate": 3e-4}})
    assert a.hash() != b.hash() and a.hash() == Config().hash()
    assert a.hash(("model",)) == b.hash(("model",))
