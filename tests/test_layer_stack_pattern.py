"""``layer_stacks`` (which block lists are layer stacks) and PEFT's own ``layers_pattern``.

``layers_pattern`` without ``layers_to_transform`` is the old spelling of ``layer_stacks``: it still works,
with a ``FutureWarning`` naming the new field, and adapter_config.json files that carry it load as before.
With ``layers_to_transform`` it keeps PEFT's meaning.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from peft_layersched import ScheduledLoraConfig

from helpers import tiny_models
from helpers.scheduled_cases import BY_FAMILY, lora_modules

T5 = BY_FAMILY["t5"]
# Only the decoder's blocks are a stack: single-stack int ids, layer 1 is decoder.block.1.
DECODER_ONLY = dict(layer_schedule={0: [1]}, init_seed=0)


def _stack_warnings(caught):
    """Warnings about layers_pattern / layer_stacks (other libraries' FutureWarnings are not ours)."""
    return [str(w.message) for w in caught if "layers_pattern" in str(w.message) or "layer_stacks" in str(w.message)]


def test_layer_stacks_chooses_the_stacks():
    model = T5.build(layer_stacks="decoder.block", **DECODER_ONLY)
    assert model.preallocated_layers == [1]
    assert lora_modules(model) == T5.modules_under(["decoder.block.1."])
    config = model.peft_config["default"]
    assert (config.layer_stacks, config.layers_pattern) == ("decoder.block", None)


def test_old_layers_pattern_still_works_with_a_future_warning():
    message = r"layers_pattern='decoder\.block'.*deprecated: write layer_stacks='decoder\.block'"
    with pytest.warns(FutureWarning, match=message):
        config = T5.config(layers_pattern="decoder.block", **DECODER_ONLY)
    assert (config.layer_stacks, config.layers_pattern) == ("decoder.block", None)
    old = get_peft_model(T5.base(), config)
    new = T5.build(layer_stacks="decoder.block", **DECODER_ONLY)
    assert old.preallocated_layers == new.preallocated_layers == [1]
    assert lora_modules(old) == lora_modules(new) == T5.modules_under(["decoder.block.1."])
    old_state = {k: v for k, v in old.state_dict().items() if "lora_" in k}
    new_state = {k: v for k, v in new.state_dict().items() if "lora_" in k}
    assert sorted(old_state) == sorted(new_state) and all(torch.equal(old_state[k], new_state[k]) for k in old_state)


def test_old_and_new_spelling_together_are_refused():
    message = r"layers_pattern='encoder\.block' and layer_stacks='decoder\.block' are both given"
    with pytest.raises(ValueError, match=message):
        T5.config(layers_pattern="encoder.block", layer_stacks="decoder.block")


def test_a_saved_config_has_layer_stacks_and_reads_back(tmp_path):
    model = T5.build(layer_stacks=["encoder.block", "decoder.block"], layer_schedule={0: ["decoder.-1"]}, init_seed=0)
    model.save_pretrained(str(tmp_path))
    with open(os.path.join(str(tmp_path), "adapter_config.json")) as handle:
        written = json.load(handle)
    assert written["layer_stacks"] == ["encoder.block", "decoder.block"]
    assert written.get("layers_pattern") is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(T5.base(), str(tmp_path))
    assert _stack_warnings(caught) == []
    assert loaded.peft_config["default"].layer_stacks == ["encoder.block", "decoder.block"]
    assert loaded.preallocated_layers == ["decoder.1"]


def _write_old_adapter(tmp_path):
    """An adapter saved the way earlier versions of this package wrote it: the stacks under "layers_pattern"."""
    model = T5.build(layer_stacks="decoder.block", **DECODER_ONLY)
    model.activate_layers(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)  # trained-looking weights, so the loaded outputs tell
    model.save_pretrained(str(tmp_path))
    path = os.path.join(str(tmp_path), "adapter_config.json")
    with open(path) as handle:
        data = json.load(handle)
    data["layers_pattern"] = data.pop("layer_stacks")
    with open(path, "w") as handle:
        json.dump(data, handle)
    return model


def test_an_old_adapter_config_loads_silently_with_its_stacks(tmp_path):
    model = _write_old_adapter(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = ScheduledLoraConfig.from_pretrained(str(tmp_path))
        loaded = PeftModel.from_pretrained(T5.base(), str(tmp_path))
    assert _stack_warnings(caught) == []
    assert (config.layer_stacks, config.layers_pattern) == ("decoder.block", None)
    assert loaded.peft_config["default"].layer_stacks == "decoder.block"
    assert loaded.preallocated_layers == [1] and loaded.ever_active_layers == [1]
    assert lora_modules(loaded) == lora_modules(model)
    inputs = T5.inputs()
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, model(**inputs).logits, atol=1e-6)


needs_layers_to_transform = pytest.mark.skipif(
    not hasattr(LoraConfig(), "layers_to_transform"), reason="this PEFT has no layers_to_transform (0.3.0)"
)


@needs_layers_to_transform
def test_layers_pattern_with_layers_to_transform_keeps_peft_meaning():
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    peft_kwargs = dict(layers_to_transform=[1, 3], layers_pattern="layer")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = ScheduledLoraConfig(**kwargs, **peft_kwargs)
    assert _stack_warnings(caught) == []
    assert (config.layers_pattern, config.layer_stacks) == ("layer", None)
    ours = get_peft_model(tiny_models.bert(num_layers=4), config)
    plain = get_peft_model(tiny_models.bert(num_layers=4), LoraConfig(**kwargs, **peft_kwargs))
    assert lora_modules(ours) == lora_modules(plain)
    assert lora_modules(ours) == BY_FAMILY["bert"].modules_under(["bert.encoder.layer.1.", "bert.encoder.layer.3."])
    assert ours.peft_config["default"].layers_pattern == "layer"  # handed to PEFT, not taken as layer_stacks
