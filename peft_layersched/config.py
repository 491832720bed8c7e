"""``ScheduledLoraConfig``: a ``peft.LoraConfig`` plus a layer schedule."""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

from peft import LoraConfig

from . import _compat
from ._model_card import add_loading_note
from .schedules import (
    CallableSpec,
    LayerId,
    ScheduleSpec,
    check_layer_list,
    check_time,
    check_unit,
    kind_names,
    parse_schedule,
)

# init_lora_weights modes that need data or a quantizer and run (partly) after get_peft_model.
_DATA_DRIVEN_INITS = ("eva", "corda", "loftq", "lora_ga")

# ScheduledLoraConfig's own fields: the schedule's. A copy of LoRA fields never takes them.
SCHEDULE_FIELDS = ("layer_schedule", "schedule_unit", "preallocate_layers", "init_seed", "ever_active_layers",
                   "layer_stacks", "schedule_position")


def _lora_fields(source: Any, target: type, given: Dict[str, Any]) -> Dict[str, Any]:
    """``target``'s init fields: deep copies of ``source``'s LoRA fields, then ``given``.

    A ``given`` field that ``target`` lacks on this PEFT is dropped when ``None``, else refused.
    """
    names = {f.name for f in dataclasses.fields(target) if f.init}
    fields = {
        name: copy.deepcopy(getattr(source, name))
        for name in names
        if name != "peft_type" and name not in SCHEDULE_FIELDS and hasattr(source, name)
    }
    for name, value in given.items():
        if name in names:
            fields[name] = value
        elif value is not None:
            raise TypeError(
                f"{target.__name__} has no field {name!r} on the installed PEFT; its fields: {sorted(names)}."
            )
    return fields


def _check_target_regex(target_modules: Any) -> None:
    # PEFT reads a str target_modules as a regex (full match); a broken one fails deep inside injection.
    if isinstance(target_modules, str) and target_modules != "all-linear":
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(
                f"target_modules={target_modules!r} is not a valid regular expression ({exc}); a str "
                f"target_modules is matched as a regex against full module names (e.g. r'.*\\.(query|value)'), "
                f"a list of names matches name suffixes (e.g. ['query', 'value'])."
            ) from None


@dataclass
class ScheduledLoraConfig(_compat.UniformLoraConfig):
    """LoRA whose trainable layers follow a schedule.

    Every ``LoraConfig`` field keeps its meaning: ``r``, ``lora_alpha``, ``target_modules``,
    ``modules_to_save``, ``init_lora_weights`` and the rest. ``lora_alpha`` defaults to 8 and
    ``lora_dropout`` to 0.0 on every PEFT; PEFT 0.3.0 ships ``None`` for both and crashes on them.

    Args:
        layer_schedule (`dict` or `callable`, *optional*):
            ``{start: layers}``: from epoch or step ``start`` on, exactly ``layers`` train, until the
            next start. ``{0: [11], 3: [1, 11]}`` trains layer 11, and from epoch 3 on layer 1 too. An
            empty list trains only ``modules_to_save``. Layer ids are ints, negative from the top, or
            ``"<stack>.<index>"`` with several stacks, e.g. ``"decoder.-1"``. Other kinds are a dict
            with a ``"type"`` key: ``"gradual"``, ``"cyclic"``, ``"sampled"``, ``"progressive"``,
            ``"adaptive"`` or ``"autofreeze"``, e.g. ``{"type": "gradual", "k": 1, "n": 1, "every": 2}``.
            A function ``t -> layers`` works too; ``save_pretrained`` records only its name. ``None``,
            the default: no schedule, plain LoRA. See the schedules page of the docs.
        schedule_unit (`str`):
            ``"epoch"``, the default, or ``"step"``: optimizer steps.
        preallocate_layers (`list`, *optional*):
            Layers that get adapters up front. Default: every layer the schedule names.
        layer_stacks (`str` or `list[str]`, *optional*):
            Dotted path or suffix of the block list(s) that are the layer stacks, e.g.
            ``"encoder.layer"`` or ``["encoder.block", "decoder.block"]``. Overrides discovery.
        layers_pattern (`str` or `list[str]`, *optional*):
            PEFT's field: with ``layers_to_transform``, for plain LoRA, the block list of PEFT's layer
            filter. Alone it is the old spelling of ``layer_stacks``, with a ``FutureWarning``.
        init_seed (`int`, *optional*):
            Adapter initial weights depend only on ``init_seed`` and the module name. ``None``: taken
            from ``torch.initial_seed()`` when a scheduled model is built, and recorded here.
        ever_active_layers (`list`, *optional*):
            Written by the tuner: layers whose adapters have been active. Saved with the adapter, so a
            loaded model knows which adapters carry trained weights.
        schedule_position (`int`, *optional*):
            Written by the tuner: the last ``t`` given to ``activate_layers``. Saved with the adapter
            and every Trainer checkpoint, so ``load_best_model_at_end`` restores where the schedule
            stood and a second Trainer stage can continue from it.

    Example:

    ```py
    >>> from peft import get_peft_model
    >>> from peft_layersched import ScheduledLoraConfig
    >>> config = ScheduledLoraConfig(r=8, target_modules=["query", "value"], layer_schedule={0: [11], 3: [1, 11]})
    >>> model = get_peft_model(bert, config)
    >>> model.activate_layers(3)
    [1, 11]
    ```
    """

    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha (scaling = lora_alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    # Declared here too: PEFT 0.3.0's LoraConfig has no layers_pattern, and the old spelling of
    # layer_stacks must work on every PEFT.
    layers_pattern: Optional[Union[List[str], str]] = field(
        default=None,
        metadata={
            "help": "PEFT's meaning: with layers_to_transform, the name of the block list PEFT's layer filter "
            "reads. Without layers_to_transform: deprecated spelling of layer_stacks."
        },
    )
    layer_schedule: Optional[Union[Dict[Any, Any], Callable[[int], List[LayerId]]]] = field(
        default=None,
        metadata={
            "help": "{start: layers}: from epoch/step `start` on, exactly `layers` train (until the next "
            "start). E.g. {0: [11], 3: [1, 11]}. Or a dict with 'type' one of "
            + ", ".join(repr(kind) for kind in kind_names())
            + " (e.g. {'type': 'gradual', 'k': 1, 'n': 1, 'every': 2}), or a callable t -> layers (not saved). "
            "None: no schedule (plain LoRA)."
        },
    )
    schedule_unit: str = field(
        default="epoch", metadata={"help": "'epoch' or 'step' (optimizer steps): the unit of schedule starts."}
    )
    preallocate_layers: Optional[List[LayerId]] = field(
        default=None,
        metadata={"help": "Layers that get adapters up front; default: every layer the schedule names."},
    )
    init_seed: Optional[int] = field(
        default=None,
        metadata={
            "help": "Adapter init depends only on (init_seed, module name). None: torch.initial_seed() at "
            "model creation, recorded in the config."
        },
    )
    ever_active_layers: Optional[List[LayerId]] = field(
        default=None,
        metadata={"help": "Set by the tuner: layers whose adapters have been active at least once."},
    )
    layer_stacks: Optional[Union[List[str], str]] = field(
        default=None,
        metadata={
            "help": "Dotted path or suffix of the model's block list(s) that are the layer stacks (e.g. "
            "'encoder.layer', ['encoder.block', 'decoder.block']); overrides automatic layer-stack discovery."
        },
    )
    schedule_position: Optional[int] = field(
        default=None,
        metadata={
            "help": "Set by the tuner: the last time t (epoch or step) given to activate_layers; a second "
            "Trainer stage can continue the schedule from here (LayerScheduleCallback(schedule_start='continue'))."
        },
    )

    def __post_init__(self) -> None:
        self._check_init_mode()  # before PEFT's own checks of those modes' extra configs
        self._take_old_layer_stacks()  # before PEFT's checks of its own layers_pattern
        super().__post_init__()  # (_compat.UniformLoraConfig: PEFT 0.3.0's None defaults replaced)
        self.validate()

    def _check_init_mode(self) -> None:
        if self.restricts_layers and self.init_lora_weights in _DATA_DRIVEN_INITS:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} cannot be combined with a layer schedule yet: it "
                f"initializes (and for some, re-ranks or re-creates) the adapters from data or a quantizer outside "
                f"get_peft_model, which the preallocated, partly left-out adapters are not built for. Use True "
                f"(default), 'gaussian', 'orthogonal', 'pissa', 'pissa_niter_<n>' or 'olora' with a schedule."
            )

    def _take_old_layer_stacks(self) -> None:
        # Earlier versions of this package spelled `layer_stacks` `layers_pattern`; PEFT's own meaning needs
        # layers_to_transform (PEFT >= 0.10 refuses it without), so without one it is the old spelling.
        old = self.layers_pattern
        if old is None or _compat.optional_field(self, "layers_to_transform") is not None:
            return
        if self.layer_stacks is not None:
            raise ValueError(
                f"layers_pattern={old!r} and layer_stacks={self.layer_stacks!r} are both given; layers_pattern "
                f"(without layers_to_transform) is the old name of layer_stacks. Give only layer_stacks."
            )
        warnings.warn(
            f"ScheduledLoraConfig(layers_pattern={old!r}) without layers_to_transform is deprecated: write "
            f"layer_stacks={old!r} (the block list(s) that are the layer stacks). layers_pattern keeps PEFT's "
            f"meaning together with layers_to_transform.",
            FutureWarning,
            stacklevel=4,
        )
        self.layer_stacks, self.layers_pattern = old, None

    @classmethod
    def upgrade_saved_keys(cls, loaded: Dict[str, Any]) -> Dict[str, Any]:
        # An adapter_config.json written by an earlier version has our layer stacks under "layers_pattern".
        if loaded.get("layers_pattern") is not None and loaded.get("layers_to_transform") is None and (
            loaded.get("layer_stacks") is None
        ):
            loaded = dict(loaded, layer_stacks=loaded["layers_pattern"], layers_pattern=None)
        return loaded

    @classmethod
    def from_lora_config(cls, lora_config: Any, **fields: Any) -> "ScheduledLoraConfig":
        """A new config with ``lora_config``'s LoRA fields and ``fields`` on top.

        The LoRA fields are deep copies: ``lora_config`` is neither changed nor shared. Schedule fields
        are never copied; give them in ``fields``.

        Example:

        ```py
        >>> ScheduledLoraConfig.from_lora_config(LoraConfig(r=8), layer_schedule={0: [-1]})
        ```
        """
        return cls(**_lora_fields(lora_config, cls, fields))

    def to_lora_config(self, **fields: Any) -> LoraConfig:
        """A plain ``peft.LoraConfig`` with this config's LoRA fields, deep copies, and ``fields`` on top."""
        return LoraConfig(**_lora_fields(self, LoraConfig, fields))

    @property
    def is_scheduled(self) -> bool:
        return self.layer_schedule is not None

    @property
    def restricts_layers(self) -> bool:
        """Whether the schedule or ``preallocate_layers`` decides which layers get adapters."""
        return self.layer_schedule is not None or self.preallocate_layers is not None

    def validate(self) -> None:
        """Check and normalise the schedule fields: JSON's string keys become ints again.

        The tuner calls it again: some PEFT versions fill a loaded config in after construction.
        In memory ``peft_type`` is LoRA; on disk it is ``"SCHEDULED_LORA"``.
        """
        self.peft_type = _compat.LORA
        check_unit(self.schedule_unit)
        if self.layer_schedule is not None:
            schedule = parse_schedule(self.layer_schedule)
            # A function stays as given: it is not JSON (to_dict/save_pretrained write its name instead).
            if not isinstance(schedule, CallableSpec) or schedule.fn is None:
                self.layer_schedule = schedule.to_json()
        if self.preallocate_layers is not None:
            self.preallocate_layers = check_layer_list(self.preallocate_layers, "preallocate_layers")
        if self.ever_active_layers is not None:
            self.ever_active_layers = check_layer_list(self.ever_active_layers, "ever_active_layers")
        if self.init_seed is not None and (isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int)):
            raise TypeError(f"init_seed must be an int or None, got {self.init_seed!r}.")
        if self.schedule_position is not None:
            self.schedule_position = check_time(self.schedule_position, "schedule_position")
        self._take_old_layer_stacks()  # (set after construction: PEFT 0.3-0.6 loading, or by hand)
        stacks = self.layer_stacks
        if stacks is not None and not (
            isinstance(stacks, str) or (isinstance(stacks, (list, tuple)) and all(isinstance(p, str) for p in stacks))
        ):
            raise TypeError(
                f"layer_stacks must be a str or a list of str (the dotted path of the block list, e.g. "
                f"'encoder.layer' or ['encoder.block', 'decoder.block']), got {stacks!r}."
            )
        _check_target_regex(self.target_modules)
        self._check_init_mode()
        if self.restricts_layers and _compat.optional_field(self, "target_parameters"):
            raise ValueError(
                "target_parameters cannot be combined with a layer schedule yet: PEFT wraps those parameters in "
                "every layer, outside the scheduled ones. Target modules (target_modules) with a schedule, or drop "
                "layer_schedule/preallocate_layers to use target_parameters as plain LoRA."
            )
        if self.is_scheduled and _compat.optional_field(self, "layers_to_transform") is not None:
            raise ValueError(
                "layers_to_transform cannot be combined with layer_schedule: the schedule decides the layers. "
                "Use preallocate_layers to give adapters to more layers than the schedule names."
            )

    def schedule(self) -> Optional[ScheduleSpec]:
        return parse_schedule(self.layer_schedule) if self.layer_schedule is not None else None

    def _loaded(self) -> None:
        self.validate()  # the schedule would keep JSON's str keys and go unchecked

    def to_dict(self) -> Dict[str, Any]:
        output = super().to_dict()
        output["peft_type"] = _compat.SCHEDULED_LORA
        if callable(output.get("layer_schedule")):
            output["layer_schedule"] = parse_schedule(output["layer_schedule"]).to_json()
        return output

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        # On disk the type names this package, so PeftModel.from_pretrained comes back here (self is untouched).
        on_disk: Dict[str, Any] = {"peft_type": _compat.SCHEDULED_LORA}
        if callable(self.layer_schedule):
            on_disk["layer_schedule"] = parse_schedule(self.layer_schedule).to_json()
            warnings.warn(
                f"layer_schedule is the Python callable {on_disk['layer_schedule']['name']}, which is not "
                f"serialized: {save_directory}/adapter_config.json records only {on_disk['layer_schedule']}. The "
                f"adapter weights, preallocate_layers and ever_active_layers are saved; after loading, give the "
                f"function back with model.set_layer_schedule(fn) before training on.",
                stacklevel=2,
            )
        self._save_as(save_directory, on_disk, **kwargs)
        # PEFT wrote the model card (README.md) before the config: it gets the import the loading needs.
        add_loading_note(save_directory)
