"""PEFT version differences (0.3.0 .. newest): type registration, configs, LoRA layers, injection, files."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import re
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import peft
import torch
from peft import PeftType
from peft.tuners.lora import LoraConfig, LoraLayer
from torch import nn

PEFT_VERSION = peft.__version__

# The PEFT type written to adapter_config.json.  A plain str: PeftType is a closed (str, Enum) and its
# members hash like their value, so every PEFT accepts str keys in its mappings.
SCHEDULED_LORA = "SCHEDULED_LORA"
LORA = PeftType.LORA

try:  # PEFT >= 0.5
    from peft.tuners.tuners_utils import BaseTunerLayer as _BaseTunerLayer

    TUNER_LAYER_TYPES = (LoraLayer, _BaseTunerLayer)
except ImportError:  # PEFT 0.3 / 0.4
    TUNER_LAYER_TYPES = (LoraLayer,)

# PEFT >= 0.6 made `disable_adapters` a read-only property over `_disable_adapters`; 0.3-0.5 use a
# plain attribute.
_DISABLE_ATTR = "_disable_adapters" if isinstance(getattr(LoraLayer, "disable_adapters", None), property) else (
    "disable_adapters"
)

# Where each PEFT version keeps its type -> class mappings (module, name, value kind).
_MAPPINGS = (
    ("peft.mapping", "PEFT_TYPE_TO_CONFIG_MAPPING", "config"),
    ("peft.peft_model", "PEFT_TYPE_TO_MODEL_MAPPING", "tuner"),  # 0.3-0.14: used by PeftModel.__init__
    ("peft.mapping", "PEFT_TYPE_TO_TUNER_MAPPING", "tuner"),  # 0.5+: inject_adapter_in_model; PeftModel 0.15+
    ("peft.utils.constants", "PEFT_TYPE_TO_PREFIX_MAPPING", "prefix"),  # 0.14
    ("peft.mapping", "PEFT_TYPE_TO_PREFIX_MAPPING", "prefix"),  # 0.15+
)


def register(config_cls: type, tuner_cls: type) -> List[str]:
    """Make PEFT build ``tuner_cls`` for ``config_cls`` and load ``SCHEDULED_LORA`` files; idempotent.

    A ``config_cls`` has ``peft_type == PeftType.LORA`` in memory, so PEFT's dispatch reaches
    ``LoraModel``: its ``__new__`` hands a config (or config dict) holding a ``config_cls`` to
    ``tuner_cls`` (a ``LoraModel`` subclass), every other config to ``LoraModel`` as before.  On disk the
    type is ``SCHEDULED_LORA``: that str goes into every type mapping the installed PEFT has, so
    ``PeftConfig``/``PeftModel.from_pretrained`` pick ``config_cls``.  ``register_peft_method`` (PEFT >=
    0.15) is not usable from outside PEFT: it requires a ``PeftType`` member; inserting into the dicts is
    what it does.  Returns the dicts written, for diagnostics.
    """
    _install_tuner_dispatch(config_cls, tuner_cls)
    values = {"config": config_cls, "tuner": tuner_cls, "prefix": "lora_"}
    written = []
    seen = set()
    for module_name, attr, kind in _MAPPINGS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        # vars(): in 0.15+ peft_model.PEFT_TYPE_TO_MODEL_MAPPING is a deprecated alias served by a
        # module __getattr__; writing through it is not wanted.
        mapping = vars(module).get(attr)
        if not isinstance(mapping, dict) or id(mapping) in seen:
            continue
        seen.add(id(mapping))
        mapping[SCHEDULED_LORA] = values[kind]
        written.append(f"{module_name}.{attr}")
    return written


def _install_tuner_dispatch(config_cls: type, tuner_cls: type) -> None:
    from peft.tuners.lora import LoraModel

    current = LoraModel.__dict__.get("__new__")
    if getattr(getattr(current, "__func__", None), "_peft_layersched_dispatch", False):
        return

    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        if cls is LoraModel:
            config = args[1] if len(args) > 1 else kwargs.get("config", kwargs.get("peft_config"))
            configs = config.values() if isinstance(config, dict) else [config]
            if any(isinstance(value, config_cls) for value in configs):
                cls = tuner_cls
        return super(LoraModel, cls).__new__(cls)

    __new__._peft_layersched_dispatch = True  # type: ignore[attr-defined]
    LoraModel.__new__ = staticmethod(__new__)


# ----------------------------------------------------------------------------------- configs


class UniformLoraConfig(LoraConfig):
    """``LoraConfig`` for subclasses that behave alike on every PEFT (not a dataclass itself: its fields
    are ``LoraConfig``'s; a mixin class before ``LoraConfig`` would give the subclass a ``__dict__``
    descriptor of its own, which hides PEFT 0.3.0's ``__dict__`` property that ``to_dict`` and
    ``save_pretrained`` read).

    * ``__post_init__``: PEFT 0.3.0's ``LoraConfig`` defaults ``lora_alpha``/``lora_dropout`` to ``None``
      (and crashes on them), and a file it wrote may carry those ``None`` s: they become this class's
      field defaults.
    * ``copy.copy``/``copy.deepcopy``: PEFT 0.3.0's config defines a ``__dict__`` property (``asdict``),
      which makes the default protocol restore nothing: the attributes are copied one by one (a callable
      value stays the same function under deepcopy).
    * ``from_pretrained``: PEFT 0.3-0.6 build the config with defaults and ``setattr()`` the loaded
      fields afterwards, so ``__post_init__`` never saw them: ``_loaded()`` runs on the result.
    * ``from_json_file``: PEFT 0.6-0.13 build configs with ``cls(**json)`` and fail on keys a newer PEFT
      wrote; 0.14+ drops them with a warning.  Here every PEFT drops them with a warning (after
      ``upgrade_saved_keys(loaded)``, which may map old names of this package's own fields).
    * ``_save_as(save_directory, on_disk, **kwargs)``: PEFT 0.3.0 writes ``asdict(self)``, not
      ``to_dict()``: the values meant for the file go onto a shallow copy, which PEFT then writes.
    """

    _NONE_IN_PEFT_030 = ("lora_alpha", "lora_dropout")

    def __post_init__(self) -> None:
        super().__post_init__()
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in self._NONE_IN_PEFT_030:
            if getattr(self, name, None) is None and defaults.get(name) is not None:
                setattr(self, name, defaults[name])

    def __copy__(self) -> Any:
        new = object.__new__(type(self))
        for key, value in dict(self.__dict__).items():
            setattr(new, key, value)
        return new

    def __deepcopy__(self, memo: Dict[int, Any]) -> Any:
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in dict(self.__dict__).items():
            setattr(new, key, copy.deepcopy(value, memo))
        return new

    def _loaded(self) -> None:
        """Check a config that PEFT filled in after construction (override)."""

    @classmethod
    def upgrade_saved_keys(cls, loaded: Dict[str, Any]) -> Dict[str, Any]:
        """The keys of a loaded ``adapter_config.json`` under their current names (override)."""
        return loaded

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any) -> Any:
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if isinstance(config, UniformLoraConfig):
            config._loaded()
        return config

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> Dict[str, Any]:
        loaded = cls.upgrade_saved_keys(super().from_json_file(path_json_file, **kwargs))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(key for key in loaded if key not in known)
        if unknown:
            warnings.warn(
                f"{path_json_file}: ignoring {unknown}, written by a newer PEFT than the installed "
                f"{PEFT_VERSION}; the adapter loads without them.",
                stacklevel=2,
            )
        return {key: value for key, value in loaded.items() if key in known}

    def _save_as(self, save_directory: str, on_disk: Dict[str, Any], **kwargs: Any) -> None:
        written = copy.copy(self)
        for key, value in on_disk.items():
            setattr(written, key, value)
        super(UniformLoraConfig, written).save_pretrained(save_directory, **kwargs)


# PeftConfig fields that only some PEFT versions have: reading one where it is missing gives None.
_OPTIONAL_FIELDS = {
    "layers_to_transform": "0.4+",
    "layers_pattern": "0.4+",
    "exclude_modules": "0.14+",
    "target_parameters": "0.17+",
}


def optional_field(config: Any, name: str) -> Any:
    """``config.<name>``, or ``None`` on a PEFT without that field (see ``_OPTIONAL_FIELDS``)."""
    if name not in _OPTIONAL_FIELDS:  # pragma: no cover - a programming error
        raise KeyError(f"{name!r} is not a known optional PEFT config field: {sorted(_OPTIONAL_FIELDS)}")
    return getattr(config, name, None)


def module_excluded(name: str, exclude_modules: Any) -> bool:
    """Whether PEFT's ``exclude_modules`` (0.14+) takes module ``name`` out: a str is a full-match regex,
    a list matches whole names or dotted suffixes."""
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, name) is not None
    return name in exclude_modules or any(name.endswith("." + key) for key in exclude_modules)


def is_tuner_layer(module: nn.Module) -> bool:
    return isinstance(module, TUNER_LAYER_TYPES)


def is_lora_layer(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer)


# PEFT >= 0.6: every LoRA layer has its own list of active adapters (``_active_adapter`` behind a read-only
# ``active_adapter`` property), which its forward and ``merge()`` follow.  0.3-0.5: one plain str per
# layer, and a per-layer sentinel there breaks ``LoraModel._get_active_adapter()`` (0.5), so a layer is
# bypassed with its disable flag instead.
PER_LAYER_ACTIVE_LIST = isinstance(getattr(LoraLayer, "active_adapter", None), property)


def tuner_active_adapters(tuner: nn.Module) -> List[str]:
    """The tuner's active adapter names (PEFT >= 0.6: ``active_adapters``; 0.3-0.5 keep one name on each
    LoRA layer, which ``LoraModel.set_adapter`` writes; the tuner itself has none)."""
    if isinstance(getattr(type(tuner), "active_adapters", None), property):
        return list(tuner.active_adapters)
    for module in tuner.model.modules():
        if isinstance(module, LoraLayer):
            return [module.active_adapter]
    return []


def route_layer(layer: nn.Module, model_active: List[str], bypassed: Any) -> None:
    """Let ``layer`` run the model's active adapters except those in ``bypassed``.

    A bypassed adapter is not in the layer's forward (no dropout, no matmul, no RNG, no gradient) and
    not in a default ``merge()``.  On PEFT >= 0.6 the layer's active-adapter list is written (its
    disable flag, which ``PeftModel.disable_adapter()`` owns, is left alone); on 0.3-0.5, where a model
    has one active adapter, the layer's disable flag is set while that adapter is bypassed.
    """
    if PER_LAYER_ACTIVE_LIST:
        layer._active_adapter = [name for name in model_active if name not in bypassed]
    else:
        setattr(layer, _DISABLE_ATTR, any(name in bypassed for name in model_active))


try:  # PEFT >= 0.8: merge / unmerge first load a layer's weights that accelerate offloaded
    from peft.tuners.tuners_utils import onload_layer as _onload_layer
except ImportError:  # PEFT 0.3 - 0.7
    _onload_layer = None


def unmerge_layer(layer: nn.Module) -> None:
    """``layer.unmerge()`` as PEFT's ``unmerge_adapter()`` calls it on each tuner layer (inside
    ``onload_layer`` on PEFT >= 0.8)."""
    if _onload_layer is None:
        layer.unmerge()
        return
    with _onload_layer(layer):
        layer.unmerge()


def layer_runs(layer: nn.Module, adapter_name: str) -> bool:
    """Whether ``adapter_name`` is in ``layer``'s forward now."""
    if bool(getattr(layer, _DISABLE_ATTR, False)):
        return False
    active = getattr(layer, "active_adapters", None)
    if active is None:  # PEFT 0.3-0.5: one str
        active = [getattr(layer, "active_adapter", None)]
    return adapter_name in active


# The LoRA parameter containers of a layer: PEFT >= 0.6 lists them in ``LoraLayer.adapter_layer_names``
# (a layer class may extend it); 0.3-0.5 have these four.
_LORA_CONTAINERS_030 = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _adapter_containers(layer: nn.Module) -> List[str]:
    names = list(getattr(layer, "adapter_layer_names", None) or _LORA_CONTAINERS_030)
    return [name for name in names if isinstance(getattr(layer, name, None), (nn.ModuleDict, nn.ParameterDict))]


def lora_weights(layer: nn.Module, adapter_name: str) -> Optional[Tuple[str, torch.Tensor, torch.Tensor]]:
    """``(kind, A, B)``: the low-rank pair of ``adapter_name`` in one LoRA layer, or ``None`` if it has none.

    ``kind`` is ``"linear"`` (``lora_A``/``lora_B`` modules: Linear, Conv1D, Conv, their weights) or
    ``"embedding"`` (``lora_embedding_A``/``lora_embedding_B`` parameters), on every PEFT version.
    """
    for kind, a_name, b_name in (("linear", "lora_A", "lora_B"), ("embedding", "lora_embedding_A", "lora_embedding_B")):
        a_container, b_container = getattr(layer, a_name, None), getattr(layer, b_name, None)
        if a_container is None or b_container is None or adapter_name not in a_container:
            continue
        a, b = a_container[adapter_name], b_container[adapter_name]
        return kind, _weight(a), _weight(b)
    return None


def _weight(item: Any) -> torch.Tensor:
    return item if isinstance(item, nn.Parameter) else item.weight


def adapter_parameters(layer: nn.Module, adapter_name: str) -> Iterator[nn.Parameter]:
    """The LoRA parameters of ``adapter_name`` in one LoRA layer (A/B; embedding A/B; DoRA magnitude)."""
    for attr in _adapter_containers(layer):
        container = getattr(layer, attr)
        if adapter_name not in container:
            continue
        item = container[adapter_name]
        if isinstance(item, nn.Parameter):
            yield item
        else:
            for param in item.parameters():
                yield param


def default_target_modules(model: nn.Module) -> Any:
    """PEFT's per-architecture default ``target_modules`` (what ``target_modules=None`` means)."""
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:  # pragma: no cover - present from 0.3.0 to 0.21
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in mapping:
        raise ValueError(
            f"target_modules is None and PEFT has no default targets for model_type={model_type!r}; "
            f"set target_modules, e.g. ['q_proj', 'v_proj'] or 'all-linear'."
        )
    return list(mapping[model_type])


class TunerHooks(object):
    """Mixin (first base, before ``LoraModel``): PEFT's injection and unload, the same on every PEFT.

    Injection runs inside ``self._scheduled_injection(model, adapter_name)`` after the adapter's config
    went through ``self._own_config(config)`` (the tuner's own copy): PEFT >= 0.5 inject through
    ``inject_adapter(model, adapter_name, ...)``, which reads the config that ``PeftModel.add_adapter`` /
    ``load_adapter`` stored in ``peft_config``; PEFT 0.3 / 0.4 through ``add_adapter(adapter_name,
    config=None)`` on ``self.model``, which stores a given config itself.  ``unload()`` (PEFT >= 0.5;
    an ``AttributeError`` before) hands the plain model to ``self._unloaded(model)``.

    No ``__slots__``: with an empty one, CPython takes this class as the subclass's layout base, and a
    ``LoraModel`` could not become the subclass by ``__class__`` assignment (``schedule_lora``).
    """

    def inject_adapter(self, *args: Any, **kwargs: Any) -> Any:  # PEFT >= 0.5
        model = args[0] if args else kwargs["model"]
        adapter_name = args[1] if len(args) > 1 else kwargs["adapter_name"]
        if getattr(model, "base_model", None) is self:
            # PEFT 0.5's PeftModel.add_adapter hands over the PeftModel itself (0.6+: the base model), so module
            # names would start with "base_model.model.": inject into the base model, as 0.6+ do.
            model = self.model
            if args:
                args = (model,) + tuple(args[1:])
            else:
                kwargs["model"] = model
        self.peft_config[adapter_name] = self._own_config(self.peft_config[adapter_name])
        with self._scheduled_injection(model, adapter_name):
            return super().inject_adapter(*args, **kwargs)  # type: ignore[misc]

    def add_adapter(self, *args: Any, **kwargs: Any) -> Any:  # PEFT 0.3 / 0.4
        parent = getattr(super(), "add_adapter", None)
        if parent is None:
            raise AttributeError("add_adapter")
        adapter_name = args[0] if args else kwargs["adapter_name"]
        if len(args) > 1 or kwargs.get("config") is not None:
            config = self._own_config(args[1] if len(args) > 1 else kwargs.pop("config"))
            args = (args[0], config) + tuple(args[2:]) if len(args) > 1 else args
            if len(args) < 2:
                kwargs["config"] = config
            self.peft_config[adapter_name] = config
        with self._scheduled_injection(self.model, adapter_name):
            return parent(*args, **kwargs)

    def unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        parent = getattr(super(), "unload", None)  # PEFT >= 0.5
        if parent is None:
            raise AttributeError("unload")
        plain = parent(*args, **kwargs)
        self._unloaded(plain)
        return plain

    # Overridden by the tuner:
    peft_config: Dict[str, Any]
    model: nn.Module

    def _own_config(self, config: Any) -> Any:  # pragma: no cover - overridden
        return config

    def _scheduled_injection(self, model: nn.Module, adapter_name: str) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def _unloaded(self, model: nn.Module) -> None:  # pragma: no cover - overridden
        pass


def get_adapter_state_dict(peft_model: nn.Module, adapter_name: str) -> Dict[str, torch.Tensor]:
    """PEFT's saved state dict of one adapter (adapter name stripped from the keys)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, adapter_name=adapter_name)


def _reads_safetensors() -> bool:
    # PEFT 0.3.0 loads adapter_model.bin only; 0.4 added safetensors support.
    try:
        from peft.utils import SAFETENSORS_WEIGHTS_NAME  # noqa: F401
    except ImportError:
        return False
    try:
        import safetensors  # noqa: F401
    except ImportError:  # pragma: no cover
        return False
    return True


PEFT_READS_SAFETENSORS = _reads_safetensors()


def install_legacy_safetensors_reader() -> None:
    """Let PEFT without safetensors support (0.3.0) load ``adapter_model.safetensors`` adapters.

    PEFT >= 0.7 saves safetensors by default; 0.3.0 looks only for ``adapter_model.bin`` and fails
    with "Can't find weights".  When only the safetensors file is there, it is converted into a
    temporary folder that PEFT then loads as usual.  Idempotent; a no-op where PEFT reads safetensors.
    """
    if PEFT_READS_SAFETENSORS:
        return
    import os
    import shutil
    import tempfile

    from peft import PeftModel

    original = PeftModel.load_adapter
    if getattr(original, "_peft_layersched_shim", False):
        return

    def load_adapter(self: Any, model_id: str, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        subfolder = kwargs.get("subfolder")
        path = os.path.join(model_id, subfolder) if subfolder else model_id
        safetensors_file = os.path.join(path, "adapter_model.safetensors")
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, "adapter_model.bin")) and (
            os.path.exists(safetensors_file)
        ):
            try:
                from safetensors.torch import load_file
            except ImportError as exc:
                raise ValueError(
                    f"{path} holds adapter_model.safetensors, which PEFT {PEFT_VERSION} cannot read; install "
                    f"safetensors, or save the adapter with save_pretrained(..., safe_serialization=False)."
                ) from exc
            folder = tempfile.mkdtemp(prefix="peft_layersched_")
            try:
                shutil.copy(os.path.join(path, "adapter_config.json"), folder)
                torch.save(load_file(safetensors_file), os.path.join(folder, "adapter_model.bin"))
                kwargs.pop("subfolder", None)
                return original(self, folder, adapter_name, *args, **kwargs)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        return original(self, model_id, adapter_name, *args, **kwargs)

    load_adapter._peft_layersched_shim = True  # type: ignore[attr-defined]
    PeftModel.load_adapter = load_adapter


def base_weight(layer: nn.Module) -> Optional[torch.Tensor]:
    """The frozen base weight a LoRA layer wraps, as ``[out_features, in_features]`` (``None``: it has no
    2-D weight, e.g. a LoRA embedding or a convolution).  PEFT >= 0.7 keeps the base module in
    ``base_layer`` (``get_base_layer()``); older LoRA layers subclass it (``nn.Linear``) and hold the weight
    themselves.  GPT-2's ``Conv1D`` stores it transposed (``[in, out]``)."""
    get_base = getattr(layer, "get_base_layer", None)
    base = get_base() if callable(get_base) else layer
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or isinstance(base, nn.Embedding):
        return None
    if weight.dim() != 2:  # (DeepSpeed ZeRO-3 partitions: the caller gathers the layer's parameters first)
        return None
    fan_in = getattr(layer, "in_features", None)
    if fan_in is not None and weight.shape[0] != weight.shape[1]:
        return weight if weight.shape[1] == fan_in else weight.t()
    return weight.t() if type(base).__name__ == "Conv1D" else weight
