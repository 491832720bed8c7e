"""``ScheduledAdapter``: one scheduled adapter of a tuner, what it is and the verbs that drive it.

``ScheduledLoraModel.scheduled_adapter(name)`` returns one. Drivers move the schedule through it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch import nn

from .. import _compat
from ..config import ScheduledLoraConfig
from ..layers import LayerIndex
from ..schedules import AdaptiveSchedule, LayerId, Schedule, check_time, parse_schedule
from .layer_state import write as write_layer_state
from .load_checks import check_deferred
from .state import TunerState, at_start


class ScheduledAdapter(object):
    """One scheduled adapter. Reads are live: each one reflects the adapter as it stands.

    Attributes: ``name``; ``index``, the model's :class:`~peft_layersched.layers.LayerIndex`;
    ``schedule``, bound to the model's layers, or ``None``; ``modules``, ``{module name: layer id}``;
    ``preallocated_layers``, ``active_layers``, ``ever_active_layers``; ``time``, the last ``t``
    given to ``activate_layers``.
    """

    __slots__ = ("name", "_tuner", "_state", "_adapter")

    def __init__(self, tuner: nn.Module, name: str, state: TunerState) -> None:
        self.name = name
        self._tuner = tuner
        self._state = state
        self._adapter = state.adapters[name]

    @property
    def index(self) -> LayerIndex:
        return self._adapter.index

    @property
    def schedule(self) -> Optional[Schedule]:
        return self._adapter.schedule

    @property
    def modules(self) -> Dict[str, Any]:
        return dict(self._adapter.modules)

    @property
    def preallocated_layers(self) -> List[LayerId]:
        return self._adapter.held_layers()

    @property
    def active_layers(self) -> List[LayerId]:
        adapter = self._adapter
        if adapter.active is not None:
            return list(adapter.active)
        if adapter.schedule is None:
            return adapter.held_layers()
        return adapter.index.sort(adapter.ever | set(at_start(adapter.schedule)))

    @property
    def ever_active_layers(self) -> List[LayerId]:
        adapter = self._adapter
        return adapter.held_layers() if adapter.schedule is None else adapter.index.sort(adapter.ever)

    @property
    def time(self) -> Optional[int]:
        return self._adapter.time

    def __repr__(self) -> str:
        return (f"ScheduledAdapter({self.name!r}, preallocated={self.preallocated_layers}, "
                f"active={self.active_layers}, ever_active={self.ever_active_layers}, time={self.time})")

    def _config(self) -> Any:
        return self._tuner.peft_config[self.name]

    def _scheduled_config(self) -> Optional[ScheduledLoraConfig]:
        """The config that records the schedule's state, if the adapter runs a schedule."""
        config = self._config()
        if isinstance(config, ScheduledLoraConfig) and self._adapter.schedule is not None:
            return config
        return None

    def _write(self) -> None:
        write_layer_state(self._tuner, self._state)

    # -------------------------------------------------------------------- the verbs of the tuner's API

    def activate_layers(self, t: Any) -> List[LayerId]:
        """Make exactly the layers scheduled at ``t`` trainable; see ``ScheduledLoraModel.activate_layers``."""
        adapter = self._adapter
        t = check_time(t)
        _refuse_undecided(adapter.schedule, t, getattr(self._config(), "schedule_unit", "epoch"))
        if adapter.schedule is None:
            active = adapter.held_layers()
            adapter.ever.update(active)
        else:
            active = adapter.schedule.active_at(t)  # bound: canonical ids in layer order
            adapter.ever.update(adapter.schedule.layers_until(t))
        adapter.active = active
        adapter.time = t
        config = self._scheduled_config()
        if config is not None:
            config.ever_active_layers = adapter.index.sort(adapter.ever)
            config.schedule_position = t
        self._write()
        return list(active)

    def set_layer_schedule(self, layer_schedule: Any) -> List[LayerId]:
        """Replace the schedule; see ``ScheduledLoraModel.set_layer_schedule``."""
        adapter = self._adapter
        preallocated = adapter.held_layers()
        schedule = parse_schedule(layer_schedule).bind(adapter.index.all_layers(), adapter.index.canonical,
                                                       preallocated)
        missing = [layer for layer in adapter.index.sort(schedule.all_layers()) if layer not in preallocated]
        if missing:
            raise ValueError(
                f"the new layer_schedule uses layer(s) {missing}, which carry no adapter (preallocated: "
                f"{preallocated}); adapters cannot be added later. Schedule only preallocated layers, or build "
                f"the model again with preallocate_layers covering them."
            )
        config = self._config()
        config.layer_schedule = layer_schedule
        config.validate()
        adapter.schedule = schedule
        self._write()
        return preallocated

    def layer_parameters(self) -> Dict[LayerId, List[nn.Parameter]]:
        """The adapter's LoRA parameters grouped by layer, every preallocated layer in layer order."""
        grouped: Dict[Any, List[nn.Parameter]] = {}
        for module_name, layer_id in self._adapter.modules.items():
            module = self._tuner.model.get_submodule(module_name)
            grouped.setdefault(layer_id, []).extend(_compat.adapter_parameters(module, self.name))
        return {layer: grouped[layer] for layer in self._adapter.index.held_layers(grouped)}

    # ------------------------------------------------------------------------------ the drivers' verbs

    def set_schedule_position(self, t: Any) -> None:
        """Record that the schedule ran up to ``t`` without changing which layers train.

        For times at which the active set stays, and for the step after a run's last optimizer step.
        """
        t = check_time(t)
        config = self._scheduled_config()
        if config is not None:
            config.schedule_position = t

    def save_schedule_state(self) -> None:
        """Write an adaptive schedule as it stands, decision log included, into the adapter's config."""
        config = self._scheduled_config()
        if config is not None and isinstance(self._adapter.schedule, AdaptiveSchedule):
            config.layer_schedule = self._adapter.schedule.as_spec().to_json()

    def restore_layer_state(self, t: Any, ever_active_layers: Any = None) -> List[LayerId]:
        """Put the schedule back where a checkpoint recorded it.

        ``activate_layers(t)`` with the ever-active set replaced by ``ever_active_layers``. By default
        that set is what the schedule activated up to ``t``.
        """
        adapter = self._adapter
        t = check_time(t)
        if ever_active_layers is not None:
            adapter.ever = set(adapter.index.canonical_list(list(ever_active_layers), "ever_active_layers"))
        else:
            adapter.ever = set()
        return self.activate_layers(t)

    def register_all_for_optimizer(self) -> None:
        """Back to the state right after ``get_peft_model``: every preallocated LoRA parameter requires grad.

        An optimizer built now holds them all. The next ``activate_layers`` applies the schedule again.
        """
        self._adapter.active = None
        self._write()

    def check_deferred_load(self) -> None:
        """Run the check of loaded weights that ``deferred_load_check`` put off, if it did.

        It covers every adapter of the tuner, now that the schedule stands where the weights were saved.
        """
        check_deferred(self._tuner, self._state)


def _refuse_undecided(schedule: Optional[Schedule], t: int, unit: str) -> None:
    """An adaptive schedule's layers come from measured signals: ``activate_layers`` only replays its log."""
    if not isinstance(schedule, AdaptiveSchedule):
        return
    due = schedule.due(t)
    if due is None:
        return
    logged = [decision["t"] for decision in schedule.decisions]
    has = f"its decision log covers {unit}s {logged[0]}..{logged[-1]}" if logged else "its decision log is empty"
    raise ValueError(
        f"activate_layers({t}): the {schedule.kind} schedule has no decision for {unit} {due} ({has}). Its layers "
        f"are chosen from signals measured during training, which activate_layers() cannot do. Drive the schedule "
        f"with LayerScheduleCallback (Trainer(callbacks=[...])), LayerScheduler (a plain loop: sched.step() / "
        f"sched.epoch_end()) or LayerScheduleFinetuning (Lightning); they decide when a decision is due and "
        f"activate its layers."
    )
