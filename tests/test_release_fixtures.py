"""What a release wrote still loads and resumes exactly: the sets in tests/fixtures/release-*/ (written by
tests/helpers/release_fixtures.py) are resumed by today's code and must end on the LoRA weights the release's
own uninterrupted run ended with, bit for bit."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch

from helpers import plain_resume, release_fixtures, tiny_models
from helpers.snapshots import lora

SETS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fixtures", "release-*")))


def written_here(root):
    """Bitwise comparisons need the stack that wrote the set."""
    with open(os.path.join(root, "versions.json")) as handle:
        wrote = json.load(handle)
    here = release_fixtures.versions()
    stack = ("torch", "transformers", "peft")
    if any(wrote[k] != here[k] for k in stack):
        pytest.skip("written on {}; this env has {}".format(
            {k: wrote[k] for k in stack}, {k: here[k] for k in stack}))


def expected(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "expected_lora.safetensors"))


def assert_same(want, got):
    assert set(want) == set(got)
    moved = sorted(name for name in want if not torch.equal(want[name], got[name]))
    assert not moved, "LoRA weights differ from the release's run: {}".format(moved[:4])


@pytest.mark.parametrize("root", SETS, ids=os.path.basename)
@pytest.mark.parametrize("kind", sorted(release_fixtures.TRAINER_SCHEDULES))
def test_a_release_trainer_checkpoint_resumes_bitwise(tmp_path, root, kind):
    written_here(root)
    checkpoint = tmp_path / "checkpoint-{}".format(release_fixtures.TRAINER_SAVE)
    shutil.copytree(os.path.join(root, "trainer-" + kind), str(checkpoint))
    model = release_fixtures.trainer_run(kind, tmp_path, resume=str(checkpoint))
    assert_same(expected(os.path.join(root, "trainer-" + kind)), lora(model))


@pytest.mark.parametrize("root", SETS, ids=os.path.basename)
@pytest.mark.parametrize("kind", ["fixed", "update"])
def test_a_release_plain_loop_checkpoint_resumes_bitwise_and_quietly(root, kind):
    written_here(root)
    folder = os.path.join(root, "plain-" + kind)
    run, said = plain_resume.resume(kind, os.path.join(folder, "checkpoint.pt"), "docs")
    assert said == []
    plain_resume.train(run, plain_resume.RESUME_AT, plain_resume.STEPS)
    assert_same(expected(folder), lora(run[0]))


@pytest.mark.parametrize("root", SETS, ids=os.path.basename)
def test_a_release_adapter_loads_with_its_schedule_and_weights(root):
    written_here(root)
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = os.path.join(root, "adapter")
    with open(os.path.join(folder, "adapter_config.json")) as handle:
        saved = json.load(handle)
    model = PeftModel.from_pretrained(tiny_models.bert(num_layers=4), folder)
    config = model.peft_config["default"]
    assert type(config).__name__ == "ScheduledLoraConfig"
    assert config.ever_active_layers == saved["ever_active_layers"]
    assert config.schedule_position == saved["schedule_position"]
    stored = {n: t for n, t in load_file(os.path.join(folder, "adapter_model.safetensors")).items() if "lora_" in n}
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(stored) == len(loaded) > 0
    for name, value in stored.items():
        tail = name.split("base_model.model.")[-1]
        match = [p for n, p in loaded.items() if n.replace(".default", "").endswith(tail)]
        assert len(match) == 1 and torch.equal(match[0], value), name
