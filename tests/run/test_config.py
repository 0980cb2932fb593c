"""Config loading as the command lines use it: names, paths, OmegaConf override syntax, error messages."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from dinov2.utils.config import CONFIGS_DIR, ConfigError, load_config


def test_list_null_and_dotted_overrides_parse_as_yaml():
    cfg = load_config("vitl14", ["crops.global_crops_scale=[0.25,1.0]", "train.stop_at_iteration=null",
                                 "train.dataset_path=ImageFolder:root=/data/x"])  # fmt: skip
    assert list(cfg.crops.global_crops_scale) == [0.25, 1.0]
    assert cfg.train.stop_at_iteration is None
    assert cfg.train.dataset_path == "ImageFolder:root=/data/x"  # split at the first '=' only
    assert cfg.student.arch == "vit_large"  # the experiment config is still underneath


def test_interpolation_in_an_override_resolves_against_the_merged_config():
    cfg = load_config(
        "vitl14", ["optim.min_lr=${optim.base_lr}", "evaluation.knn.batch_size=${train.batch_size_per_gpu}"]
    )
    assert cfg.optim.min_lr == 2.0e-04  # vitl14's base_lr, not the default's 0.004
    assert cfg.evaluation.knn.batch_size == 32


def test_interpolation_in_an_experiment_config_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("teacher:\n  warmup_teacher_temp_epochs: ${optim.warmup_epochs}\n")
    cfg = load_config(str(path), ["optim.warmup_epochs=5"])  # a key of another section, set by a later layer
    assert cfg.teacher.warmup_teacher_temp_epochs == 5


def test_an_interpolation_that_does_not_resolve_fails_at_load_naming_the_key():
    with pytest.raises(ConfigError, match=r"'optim\.min_lr'.*optim\.baselr"):
        load_config(None, ["optim.min_lr=${optim.baselr}"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batch_size_per_gpu=abc", "train.batch_size_per_gpu"),
        ("optim.base_lr=fast", "optim.base_lr"),
        ("crops.global_crops_scale=0.5", "crops.global_crops_scale"),
        ("crops.global_crops_scale=[small,1.0]", "crops.global_crops_scale"),
        ("crops=5", "crops"),
    ],
)
def test_a_value_of_the_wrong_kind_names_its_key(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        load_config(None, [override])


def test_a_wrong_kind_in_a_config_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  num_workers: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml(.|\n)*'train\.num_workers'"):
        load_config(str(path))


def test_an_empty_section_is_refused_instead_of_erasing_the_section(tmp_path):
    # "optim:" with every key under it commented out is null in YAML; merged, it would replace the whole
    # optim section by None (and the run would fail later on 'NoneType' has no attribute 'base_lr').
    path = tmp_path / "empty.yaml"
    path.write_text("optim:\n#  base_lr: 0.001\ntrain:\n  batch_size_per_gpu: 8\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml(.|\n)*'optim' is a section(.|\n)*got null"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"'evaluation\.knn' is a section"):
        load_config(None, ["evaluation.knn=null"])
    assert load_config(None, ["train.stop_at_iteration=null", "optim.clip_grad=null"]).optim.clip_grad is None


def test_values_several_keys_take_interchangeably_still_pass():
    cfg = load_config(None, ["train.compile=inductor", "train.activation_checkpointing=selective",
                             "compute_precision.fsdp_mixed_precision=true", "teacher.final_momentum_teacher=0.9995",
                             "optim.epochs=1e1", "evaluation.knn.nb_knn=[5]"])  # fmt: skip
    assert cfg.train.compile == "inductor" and cfg.teacher.final_momentum_teacher == 0.9995
    assert list(cfg.evaluation.knn.nb_knn) == [5]


def test_an_override_yaml_cannot_parse_is_named():
    with pytest.raises(ConfigError, match=r"crops\.global_crops_scale=\[0\.3,1\.0'"):
        load_config(None, ["crops.global_crops_scale=[0.3,1.0"])


def test_typo_suggests_the_nearest_key():
    with pytest.raises(ConfigError, match=r"'crops\.global_crop_scale'.*did you mean 'crops\.global_crops_scale'"):
        load_config(None, ["crops.global_crop_scale=[0.3,1.0]"])


def test_config_by_name_kind_and_path_and_saved_config_reloads(tmp_path):
    by_kind = load_config("distill/vits14")
    by_path = load_config(str(CONFIGS_DIR / "distill" / "vits14.yaml"))
    assert by_kind == by_path and by_kind.distillation.enabled is True
    cfg = load_config("vitl14", ["optim.min_lr=${optim.base_lr}", "train.output_dir=" + str(tmp_path)])
    saved = tmp_path / "config.yaml"
    OmegaConf.save(cfg, saved)  # what the training entry point writes
    assert load_config(str(saved)) == cfg
    assert load_config(str(saved)).optim.min_lr == 2.0e-04


def test_a_config_file_that_is_not_a_yaml_mapping_is_named(tmp_path):
    broken, listing = tmp_path / "broken.yaml", tmp_path / "listing.yaml"
    broken.write_text("train:\n  batch_size_per_gpu: [1,\n")
    listing.write_text("- optim.epochs=1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml is not valid YAML"):
        load_config(str(broken))
    with pytest.raises(ConfigError, match=r"listing\.yaml must hold a mapping"):
        load_config(str(listing))


@pytest.mark.parametrize(
    "name, suggested",
    [
        ("quickstrat", "train/quickstart"),
        ("distill/vits41", "distill/vits14"),
        ("vitl16_shrt.yaml", "train/vitl16_short"),
    ],
)
def test_a_misspelt_config_name_suggests_the_shipped_one_it_would_load(name, suggested):
    # A bare name resolves kind by kind (train first), so the suggestion is the train config, not distill's.
    with pytest.raises(FileNotFoundError, match=rf"{name!r}.*did you mean '{suggested}'"):
        load_config(name)


def test_a_directory_given_as_config_is_named_as_one(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text("optim:\n  epochs: 1\n")
    with pytest.raises(FileNotFoundError, match=r"is a directory: pass a config file \(a run's is its config\.yaml\)"):
        load_config(str(tmp_path))
    assert load_config(str(tmp_path / "config.yaml")).optim.epochs == 1
    (tmp_path / "quickstart").mkdir()  # a folder named like a shipped config does not hide it
    monkeypatch.chdir(tmp_path)
    assert load_config("quickstart").student.arch == "vit_tiny"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.gpu_augmentation=flase", "train.gpu_augmentation"),
        ("distillation.enabled=Ture", "distillation.enabled"),
        ("evaluation.knn.at_start=fasle", "evaluation.knn.at_start"),
        ("train.compile=flase", "train.compile"),
    ],
)
def test_a_misspelt_boolean_names_its_key(override, key):
    # Such a value is a non-empty string, which the code would read as true (bool("flase") is True).
    with pytest.raises(ConfigError, match=rf"'{key}' expects true or false"):
        load_config(None, [override])


def test_a_quoted_boolean_in_a_config_file_names_its_key(tmp_path):
    path = tmp_path / "quoted.yaml"
    path.write_text('train:\n  gpu_augmentation: "false"\n')  # a string, and so true for the code
    with pytest.raises(ConfigError, match=r"quoted\.yaml(.|\n)*'train\.gpu_augmentation' expects true or false"):
        load_config(str(path))
    # booleans, their YAML spellings and torch.compile backend names still pass
    cfg = load_config(None, ["train.gpu_augmentation=off", "distillation.enabled=false", "train.compile=aot_eager"])
    assert cfg.train.gpu_augmentation is False and cfg.train.compile == "aot_eager"


def test_an_option_after_the_first_override_is_named_as_such():
    # argparse puts everything after the first key=value into the overrides (REMAINDER)
    with pytest.raises(ConfigError, match=r"'--no-resume'.*options .*go before the first key=value override"):
        load_config(None, ["optim.epochs=1", "--no-resume"])


@pytest.mark.parametrize("key", ["optim.base_lr", "train.seed", "optim.epochs"])
def test_null_for_a_number_key_names_the_key(key):
    """null reached float()/int() later and failed with a bare TypeError naming no key."""
    with pytest.raises(ConfigError, match=rf"'{key}' expects a number .*got null"):
        load_config(None, [f"{key}=null"])


def test_number_keys_whose_null_has_a_meaning_keep_it():
    """student.layerscale=null means no LayerScale (the blocks' gammas are absent), as in a config.yaml."""
    from dinov2.models import build_model_from_cfg

    cfg = load_config(None, ["student.layerscale=null", "student.arch=vit_tiny", "student.depth=1",
                             "student.embed_dim=32", "student.num_heads=2", "student.patch_size=8",
                             "student.interpolate_offset=null", "optim.clip_grad=null"])  # fmt: skip
    student, _, _ = build_model_from_cfg(cfg)
    assert not any("ls1" in name for name, _ in student.named_parameters())


def test_quoted_true_or_false_for_train_compile_still_reads_as_the_boolean():
    assert load_config(None, ['train.compile="false"']).train.compile == "false"
    with pytest.raises(ConfigError, match="'train.compile' expects true or false"):
        load_config(None, ["train.compile=flase"])


def test_an_empty_config_file_is_refused(tmp_path):
    """An empty file (one not saved yet, or comments only) used to run the default config silently."""
    path = tmp_path / "mine.yaml"
    path.write_text("# optim:\n#   base_lr: 1e-3\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml is empty"):
        load_config(str(path))
