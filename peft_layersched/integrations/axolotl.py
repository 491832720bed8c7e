"""The axolotl plugin: ``adapter: scheduled_lora`` with a ``layer_schedule:`` in axolotl's YAML.

.. code-block:: yaml

    plugins:
      - peft_layersched.integrations.axolotl.LayerSchedulePlugin
    adapter: scheduled_lora          # LoRA whose trainable layers follow layer_schedule
    lora_target_modules: [q_proj, v_proj]
    layer_schedule: {0: [-1], 20: [-2, -1]}   # any ScheduledLoraConfig layer_schedule
    schedule_unit: step                       # "epoch" (default) or "step"
    layer_schedule_callback:                  # optional: LayerScheduleCallback's options
      new_layer_lr_scale: 0.5

With ``adapter: lora`` or ``qlora`` and a ``layer_schedule:``, the callback schedules axolotl's own LoRA.
This module imports axolotl; ``import peft_layersched`` does not.
"""

from __future__ import annotations

import typing
from typing import Any, Dict, List, Optional, Union

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from pydantic import BaseModel, Field, create_model, model_validator

from ..config import ScheduledLoraConfig
from ..schedules import LayerId, check_layer_list, check_unit, parse_schedule
from ..training import ScheduleOptions, check_options
from ..training.options import FIELDS
from .hf_trainer import LayerScheduleCallback

ADAPTER = "scheduled_lora"
# axolotl's own LoRA adapters, which the callback adopts (bring your own LoRA)
ADOPTED = ("lora", "qlora")

# The YAML keys that become ScheduledLoraConfig fields (same names); with adapter: lora / qlora only the
# first two apply (LoRA sits where axolotl put it).
_CONFIG_KEYS = ("layer_schedule", "schedule_unit", "preallocate_layers", "layer_stacks", "init_seed")
_ADOPTED_KEYS = ("layer_schedule", "schedule_unit")
_CALLBACK_KEY = "layer_schedule_callback"
# LayerScheduleCallback's options under layer_schedule_callback: (the adapter is the one axolotl builds).
_CALLBACK_DEFAULTS = {name: f.default for name, f in FIELDS.items() if name != "adapter_name"}


def _plain(value: Any) -> Any:
    # axolotl's DictDefault (an addict.Dict) answers every missing key with an empty DictDefault: hand the
    # config plain dicts and lists.
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _given(data: Any, key: str) -> Any:
    value = data.get(key)
    return None if value is None or (isinstance(value, dict) and not value and key != "layer_schedule") else value


def check_axolotl_config(data: Dict[str, Any]) -> None:
    """Check the schedule keys of an axolotl config (the raw YAML dict); raise ``ValueError``/``TypeError``."""
    adapter = data.get("adapter")
    given = [key for key in _CONFIG_KEYS + (_CALLBACK_KEY,) if _given(data, key) is not None]
    if adapter in ADOPTED:
        if not given:
            return
        if _given(data, "layer_schedule") is None:
            raise ValueError(
                f"{', '.join(given)} given with adapter: {adapter} but no layer_schedule: give one (e.g. "
                f"layer_schedule: {{0: [-1], 20: [-2, -1]}}) to schedule axolotl's LoRA, or remove "
                f"{', '.join(given)}."
            )
        only_scheduled = [key for key in given if key not in _ADOPTED_KEYS + (_CALLBACK_KEY,)]
        if only_scheduled:
            raise ValueError(
                f"{', '.join(only_scheduled)} given with adapter: {adapter}: axolotl's {adapter} puts LoRA on every "
                f"layer of lora_target_modules (or peft_layers_to_transform) and the schedule picks among those, so "
                f"{', '.join(only_scheduled)} cannot apply. Use adapter: {ADAPTER} for adapters on the scheduled "
                f"layers only, or remove {', '.join(only_scheduled)}."
            )
    elif adapter != ADAPTER:
        if not given:
            return
        raise ValueError(
            f"{', '.join(given)} given with adapter: {adapter!r}; they need adapter: {ADAPTER} (LoRA on the "
            f"scheduled layers), or adapter: lora / qlora (axolotl's LoRA, scheduled by the callback), or "
            f"remove {', '.join(given)}."
        )
    elif _given(data, "layer_schedule") is None:
        raise ValueError(
            f"adapter: {ADAPTER} needs a layer_schedule, e.g. layer_schedule: {{0: [-1], 20: [-2, -1]}} (from "
            f"epoch/step 0 the top layer trains, from 20 on the top two) or layer_schedule: {{type: gradual, k: 1, "
            f"every: 1}}. For LoRA on every layer use adapter: lora."
        )
    quantized = [key for key in ("load_in_4bit", "load_in_8bit", "gptq") if data.get(key)]
    if quantized and adapter == ADAPTER:
        raise ValueError(
            f"adapter: {ADAPTER} cannot be combined with {', '.join(quantized)} yet: axolotl quantizes the base "
            f"model (bitsandbytes) and prepares it for k-bit training only for adapter: qlora / lora, so the base "
            f"would load unquantized. Use adapter: qlora with the layer_schedule (the callback schedules axolotl's "
            f"QLoRA), or remove {', '.join(quantized)}."
        )
    parse_schedule(_plain(data["layer_schedule"]))
    check_unit(data.get("schedule_unit") or "epoch")
    for key in ("preallocate_layers",):
        if _given(data, key) is not None:
            check_layer_list(_plain(data[key]), key)
    check_options(**_callback_options(data.get(_CALLBACK_KEY), with_defaults=True))


def _callback_options(given: Any, with_defaults: bool = False) -> Dict[str, Any]:
    given = _plain(given) or {}
    if not isinstance(given, dict):
        raise TypeError(
            f"{_CALLBACK_KEY} must be a mapping of LayerScheduleCallback options "
            f"({', '.join(_CALLBACK_DEFAULTS)}), got {given!r}."
        )
    unknown = sorted(set(given) - set(_CALLBACK_DEFAULTS))
    if unknown:
        raise ValueError(
            f"{_CALLBACK_KEY} has unknown option(s) {', '.join(map(str, unknown))}; valid: "
            f"{', '.join(_CALLBACK_DEFAULTS)} (LayerScheduleCallback's arguments)."
        )
    options = {k: v for k, v in given.items() if v is not None}
    return dict(_CALLBACK_DEFAULTS, **options) if with_defaults else options


_HINTS = typing.get_type_hints(ScheduleOptions)
# ``layer_schedule_callback:``: the options of ScheduleOptions, each optional (unset: the option's default).


class _CallbackArgs(BaseModel):
    """``layer_schedule_callback:``: :class:`~peft_layersched.LayerScheduleCallback`'s options."""


LayerScheduleCallbackArgs = create_model(
    "LayerScheduleCallbackArgs", __base__=_CallbackArgs,
    **{name: (Optional[_HINTS[name]], Field(default=None, description=FIELDS[name].metadata["help"]))
       for name in _CALLBACK_DEFAULTS},
)


class LayerScheduleArgs(BaseModel):
    """The YAML keys of :class:`LayerSchedulePlugin` (merged into axolotl's config model)."""

    layer_schedule: Optional[Dict[Any, Any]] = Field(
        default=None,
        description="With adapter: scheduled_lora, lora or qlora: {start: layers} (from epoch/step `start` on "
        "exactly `layers` train), or {type: gradual|cyclic|sampled|adaptive|autofreeze, ...}; see "
        "ScheduledLoraConfig.layer_schedule.",
    )
    schedule_unit: Optional[str] = Field(
        default=None, description="'epoch' (default) or 'step' (optimizer steps): the unit of the schedule."
    )
    preallocate_layers: Optional[List[LayerId]] = Field(
        default=None,
        description="adapter: scheduled_lora only: layers that get adapters up front; default: every layer the "
        "schedule names.",
    )
    layer_stacks: Optional[Union[List[str], str]] = Field(
        default=None, description="Dotted path of the model's block list(s), overriding automatic discovery."
    )
    init_seed: Optional[int] = Field(
        default=None, description="Adapter init depends only on (init_seed, module name)."
    )
    layer_schedule_callback: Optional[LayerScheduleCallbackArgs] = Field(
        default=None, description="LayerScheduleCallback's options (new_layer_lr_scale, ...)."
    )

    @model_validator(mode="before")
    @classmethod
    def check_layer_schedule(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_axolotl_config(data)
        return data


def scheduled_lora_config(lora_config: Any, cfg: Any) -> ScheduledLoraConfig:
    """``ScheduledLoraConfig``: every field of axolotl's ``LoraConfig`` plus the schedule keys of ``cfg``."""
    kwargs = {}
    for key in _CONFIG_KEYS:
        value = _given(cfg, key)
        if value is not None:
            kwargs[key] = _plain(value)
    return ScheduledLoraConfig.from_lora_config(lora_config, **kwargs)


class LayerSchedulePlugin(BasePlugin):
    """axolotl plugin: ``adapter: scheduled_lora``, LoRA whose trainable layers follow ``layer_schedule``.

    Example (axolotl YAML):

    .. code-block:: yaml

        plugins: [peft_layersched.integrations.axolotl.LayerSchedulePlugin]
        adapter: scheduled_lora
        lora_r: 8
        lora_target_modules: [q_proj, v_proj]
        layer_schedule: {0: [-1], 2: [-2, -1]}
        schedule_unit: epoch
    """

    def get_input_args(self) -> str:
        return LayerScheduleArgs.__module__ + "." + LayerScheduleArgs.__name__

    def get_adapter_capabilities(self) -> List[AdapterCapabilities]:
        # relora=False: ReLoRA's restarts merge and re-create adapters on every layer.
        return [AdapterCapabilities(name=ADAPTER, lora_like=True, relora=False)]

    def load_adapter(self, model: Any, cfg: Any, inference: bool = False, config_only: bool = False) -> Any:
        if cfg.adapter != ADAPTER:
            return None
        from axolotl.loaders.adapter import load_lora
        from peft import PeftModel, get_peft_model

        # axolotl's own LoraConfig (lora_target_linear discovery, dora/rslora, rank/alpha patterns, other
        # plugins' get_lora_config_kwargs), built without touching the model.
        _, lora_config = load_lora(model, cfg, inference=inference, config_only=True)
        config = scheduled_lora_config(lora_config, cfg)
        if config_only:
            return None, config
        model_kwargs: Dict[str, Any] = {}
        if cfg.peft_autocast_adapter_dtype is not None:
            model_kwargs["autocast_adapter_dtype"] = cfg.peft_autocast_adapter_dtype
        if cfg.lora_model_dir:
            # As axolotl's load_lora: the saved adapter_config.json (schedule included) governs.
            model = PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=not inference, **model_kwargs)
            config = model.peft_config[model.active_adapter]
        else:
            model = get_peft_model(model, config, **model_kwargs)
        model.print_trainable_parameters()
        return model, config

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> List[Any]:
        # Before the Trainer exists: LayerScheduleCallback needs the Trainer's on_init_end (where it adopts
        # axolotl's own LoRA for adapter: lora / qlora).
        options = _callback_options(cfg.get(_CALLBACK_KEY))
        if cfg.adapter == ADAPTER:
            return [LayerScheduleCallback(**options)]
        if cfg.adapter in ADOPTED and _given(cfg, "layer_schedule") is not None:
            return [LayerScheduleCallback(
                layer_schedule=_plain(cfg.layer_schedule), schedule_unit=_given(cfg, "schedule_unit"), **options
            )]
        return []
