"""The training scripts' command line: flags grouped by concern in --help, descriptive aliases of the short flags on
the command line and in YAML files."""

import dataclasses

import pytest

from simlap_hf.training import FINETUNE_ARGUMENTS, FUSE_ARGUMENTS, PRETRAIN_ARGUMENTS, parse_args
from simlap_hf.training.flag_groups import FLAG_ALIASES, FLAG_GROUPS, GroupedArgumentParser, flag_group

SCRIPTS = {"pretrain": PRETRAIN_ARGUMENTS, "finetune": FINETUNE_ARGUMENTS, "fuse": FUSE_ARGUMENTS}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_a_group(script):
    unplaced = [
        field.name
        for dtype in SCRIPTS[script]
        for field in dataclasses.fields(dtype)
        if field.init and flag_group(field.name, dtype) is None
    ]
    assert not unplaced, f"add these flags to FLAG_GROUPS in simlap_hf/training/flag_groups.py: {unplaced}"


def test_help_lists_flags_by_concern():
    help_text = GroupedArgumentParser(PRETRAIN_ARGUMENTS).format_help()
    positions = [help_text.index(f"\n{title} options:") for title in FLAG_GROUPS]
    assert positions == sorted(positions)
    assert "other options:" not in help_text
    optimisation = help_text[help_text.index("\noptimisation options:") : help_text.index("\nevaluation options:")]
    assert "--learning_rate" in optimisation and "--dataset_name" not in optimisation
    assert "--auto_augment" in help_text and "usage:" in help_text and "[CONFIG.yaml]" in help_text


def test_aliases_are_accepted_on_the_command_line_and_in_yaml(tmp_path):
    short = parse_args(PRETRAIN_ARGUMENTS, ["--ra", "2", "--aa", "none", "--opt", "sgd"])
    descriptive = parse_args(
        PRETRAIN_ARGUMENTS, ["--repeated_augmentations", "2", "--auto_augment", "none", "--optimizer", "sgd"]
    )
    assert short == descriptive
    config = tmp_path / "run.yaml"
    config.write_text("repeated_augmentations: 2\nauto_augment: none\noptimizer: sgd\n")
    assert parse_args(PRETRAIN_ARGUMENTS, [str(config)]) == short
    assert set(FLAG_ALIASES) <= {f.name for types in SCRIPTS.values() for t in types for f in dataclasses.fields(t)}


def test_a_yaml_key_given_under_both_names_is_an_error(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("ra: 2\nrepeated_augmentations: 3\n")
    with pytest.raises(ValueError, match="sets 'ra' twice"):
        parse_args(PRETRAIN_ARGUMENTS, [str(config)])
