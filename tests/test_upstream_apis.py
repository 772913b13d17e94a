"""The private upstream APIs the package relies on, one test each.

A private name can disappear in any release of its library. Each test names the API, the library version that was
found, and the package code that uses it, so that an upgrade that removes it fails here, with that message, instead of
somewhere deep inside a training run.
"""

from __future__ import annotations

import importlib.metadata
import platform

import pytest
import torch


def _require(condition: bool, api: str, library: str, used_by: str) -> None:
    if not condition:
        version = platform.python_version() if library == "Python" else importlib.metadata.version(library)
        pytest.fail(f"{library} {version} no longer provides {api}, which {used_by} relies on; adapt that code.")


def test_timm_group_with_matcher():
    from timm.models import _manipulate

    function = getattr(_manipulate, "group_with_matcher", None)
    _require(callable(function), "timm.models._manipulate.group_with_matcher", "timm", "the layer-wise lr decay groups")
    groups = function(
        [("stem.weight", None), ("block.weight", None), ("head.weight", None)],
        {"stem": r"^stem", "blocks": r"^block"},
        return_values=False,
        reverse=True,
    )
    # reverse=True maps each name to its group ordinal: the stem before the blocks; the head, matched by neither, last
    assert groups["stem.weight"] < groups["block.weight"] < groups["head.weight"]


def test_timm_scheduler_get_lr():
    from timm.scheduler import CosineLRScheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = CosineLRScheduler(optimizer, t_initial=10, warmup_t=2, warmup_lr_init=0.01, t_in_epochs=False)
    _require(
        callable(getattr(scheduler, "_get_lr", None)),
        "Scheduler._get_lr(step)",
        "timm",
        "simlap_hf.training.loop (--num_train_epochs changed on resume)",
    )
    rates = scheduler._get_lr(5)
    assert isinstance(rates, list | tuple) and 0.0 < rates[0] <= 0.1


def test_torch_assert_async():
    _require(
        callable(getattr(torch, "_assert_async", None)),
        "torch._assert_async",
        "torch",
        "simlap_hf.modeling_simlap.check_labels (label check without a host sync)",
    )
    torch._assert_async(torch.tensor(True), "passes")


def test_transformers_is_hf_initialized_flag():
    """transformers skips ``_init_weights`` for tensors that carry ``_is_hf_initialized``; the package sets it on
    the timm backbone so that its own initialisation is kept."""
    import inspect

    from transformers import modeling_utils

    source = inspect.getsource(modeling_utils)
    _require(
        "_is_hf_initialized" in source,
        "the _is_hf_initialized tensor flag",
        "transformers",
        "SimLAPPreTrainedModel._mark_initialised (keeping timm's backbone initialisation)",
    )


def test_transformers_hf_argument_parser_hooks():
    """GroupedArgumentParser places each dataclass field into its --help group by overriding these two methods."""
    from transformers import HfArgumentParser

    for name in ("_add_dataclass_arguments", "_parse_dataclass_field"):
        _require(
            callable(getattr(HfArgumentParser, name, None)),
            f"HfArgumentParser.{name}",
            "transformers",
            "simlap_hf.training.flag_groups.GroupedArgumentParser (flag groups in --help)",
        )
    from simlap_hf.training import PRETRAIN_ARGUMENTS
    from simlap_hf.training.flag_groups import GroupedArgumentParser

    assert "\nmodel options:" in GroupedArgumentParser(PRETRAIN_ARGUMENTS).format_help()


def test_datasets_imagefolder_extensions():
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = getattr(ImageFolder, "EXTENSIONS", None)
    _require(
        bool(extensions), "ImageFolder.EXTENSIONS", "datasets", "simlap_hf.data.images.list_image_files (file listing)"
    )
    assert ".png" in {extension.lower() for extension in extensions}


def test_torch_compile_orig_mod():
    model = torch.nn.Linear(2, 2)
    compiled = torch.compile(model, backend="eager")
    _require(
        getattr(compiled, "_orig_mod", None) is model,
        "the _orig_mod attribute of torch.compile's wrapper",
        "torch",
        "simlap_hf.utils.unwrap_model (saving a compiled model)",
    )


def test_argparse_actions():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--flag", type=int)
    actions = getattr(parser, "_actions", None)
    _require(
        isinstance(actions, list),
        "argparse.ArgumentParser._actions",
        "Python",
        "simlap_hf.training.arguments._check_config_values (YAML values converted as their flags)",
    )
    assert {action.dest: action.type for action in actions}["flag"] is int
