"""Every difference between PEFT/transformers/torch versions lives here.

The rest of the package reads as if there were one PEFT.  We detect features, not version numbers,
except where noted.  Each function's docstring says which versions behave how.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import math
import re
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import peft
import torch
from peft import PeftType
from peft.tuners.lora import LoraLayer
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


class UniformConfig(object):
    """Mixin (first base, before ``LoraConfig``) that makes a config subclass behave alike on every PEFT.

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
      ``_renamed_keys(loaded)``, which may map old names of this package's own fields).
    * ``_save_as(save_directory, on_disk, **kwargs)``: PEFT 0.3.0 writes ``asdict(self)``, not
      ``to_dict()``: the values meant for the file go onto a shallow copy, which PEFT then writes.
    """

    _NONE_IN_PEFT_030 = ("lora_alpha", "lora_dropout")

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}  # type: ignore[arg-type]
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
    def _renamed_keys(cls, loaded: Dict[str, Any]) -> Dict[str, Any]:
        """The keys of a loaded ``adapter_config.json`` under their current names (override)."""
        return loaded

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any) -> Any:
        config = super().from_pretrained(  # type: ignore[misc]
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        if isinstance(config, UniformConfig):
            config._loaded()
        return config

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> Dict[str, Any]:
        loaded = cls._renamed_keys(super().from_json_file(path_json_file, **kwargs))  # type: ignore[misc]
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
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
        super(UniformConfig, written).save_pretrained(save_directory, **kwargs)  # type: ignore[misc]


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


def layer_runs(layer: nn.Module, adapter_name: str) -> bool:
    """Whether ``adapter_name`` is in ``layer``'s forward now."""
    if bool(getattr(layer, _DISABLE_ATTR, False)):
        return False
    active = getattr(layer, "active_adapters", None)
    if active is None:  # PEFT 0.3-0.5: one str
        active = [getattr(layer, "active_adapter", None)]
    return adapter_name in active


def layer_adapter_names(layer: nn.Module) -> List[str]:
    """The adapters whose weights ``layer`` holds (``LoraLayer.adapter_layer_names`` where PEFT has it)."""
    names: List[str] = []
    for attr in _adapter_containers(layer):
        for key in getattr(layer, attr).keys():
            if key not in names:
                names.append(key)
    return names


# The LoRA parameter containers of a layer: PEFT >= 0.6 lists them in ``adapter_layer_names``; 0.3-0.5
# have the first four.
_LORA_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _adapter_containers(layer: nn.Module) -> List[str]:
    names = list(getattr(layer, "adapter_layer_names", None) or _LORA_CONTAINERS)
    return [name for name in names if isinstance(getattr(layer, name, None), (nn.ModuleDict, nn.ParameterDict))]


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
    """

    def inject_adapter(self, *args: Any, **kwargs: Any) -> Any:  # PEFT >= 0.5
        model = args[0] if args else kwargs["model"]
        adapter_name = args[1] if len(args) > 1 else kwargs["adapter_name"]
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


def fork_rng() -> Any:
    """A context that restores the global CPU (and CUDA) RNG state on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


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


def _transformers_version() -> Any:
    import transformers
    from packaging.version import Version

    return Version(Version(transformers.__version__).base_version)


def update_steps_per_epoch(train_dataloader: Any, gradient_accumulation_steps: int) -> int:
    """Optimizer steps per epoch the way the installed Trainer counts them (floor <= 4.51, ceil >= 4.52)."""
    from packaging.version import Version

    try:
        batches = len(train_dataloader)
    except TypeError:
        return 1
    accumulation = max(int(gradient_accumulation_steps or 1), 1)
    if _transformers_version() >= Version("4.52"):
        return max(int(math.ceil(batches / float(accumulation))), 1)
    return max(batches // accumulation, 1)


def trainer_resumes_adapter_checkpoints() -> bool:
    """transformers >= 4.31 resumes a PeftModel from its adapter files; 4.30 needs a full weights file."""
    from packaging.version import Version

    return _transformers_version() >= Version("4.31")


def write_legacy_resume_weights(model: Any, args: Any, state: Any) -> Optional[str]:
    """Make the Trainer checkpoint just saved resumable on transformers 4.30; a no-op on 4.31+.

    transformers 4.30 resumes only from a full weights file, which a PeftModel checkpoint lacks: the
    trainable part (LoRA + ``modules_to_save``) is written to ``checkpoint-<step>/pytorch_model.bin``,
    which that Trainer loads non-strictly.  For ``TrainerCallback.on_save(args, state, ...)``; returns
    the path written, or ``None``.
    """
    import os

    if trainer_resumes_adapter_checkpoints() or model is None:
        return None
    folder = os.path.join(args.output_dir, "checkpoint-{}".format(state.global_step))
    if not (os.path.isdir(folder) and args.should_save):
        return None
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    path = os.path.join(folder, "pytorch_model.bin")
    torch.save(weights, path)
    return path


def linear_types() -> Tuple[type, ...]:
    """The module types ``target_modules="all-linear"`` means: ``nn.Linear`` and transformers' ``Conv1D``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


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


def empty_weights() -> Any:
    """A context in which modules are built without allocating their weights, and the device it uses.

    Returns ``(context, device_name)``: ``with torch.device("meta")`` where torch has it (2.0+); torch
    1.13 has the meta device but not the context manager, so accelerate's ``init_empty_weights`` (PEFT
    depends on accelerate); else plain CPU allocation.
    """
    import contextlib

    meta = torch.device("meta")
    if hasattr(meta, "__enter__"):
        return meta, "meta"
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - every supported PEFT installs accelerate
        return contextlib.nullcontext(), "cpu"
    return init_empty_weights(include_buffers=True), "meta"


# The input-require-grads forward hooks (``output.requires_grad_(True)`` on the input embeddings):
# transformers' ``enable_input_require_grads`` (4.30 .. 5.x; 5.x's gradient_checkpointing_enable calls it
# for every model that reads input_ids) and PEFT's fallback for models without that method (0.4+).
# transformers 4.x keeps only the last handle (a second call orphans the first hook) and 5.x keeps a
# list, so they are found on the modules themselves rather than through transformers' handles.
_INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


def input_require_grads_hooks_of(module: nn.Module) -> List[Any]:
    """``(key, hook)`` for each input-require-grads hook registered on ``module`` itself."""
    found = []
    for key, hook in module._forward_hooks.items():
        if getattr(hook, "__name__", None) in _INPUT_GRAD_HOOKS:
            origin = str(getattr(hook, "__module__", "") or "").split(".")[0]
            if origin in ("transformers", "peft"):
                found.append((key, hook))
    return found


def input_require_grads_hooks(model: nn.Module) -> List[Any]:
    """``(module, key, hook)`` for each input-require-grads hook registered on a module of ``model``."""
    return [(m, key, hook) for m in model.modules() for key, hook in input_require_grads_hooks_of(m)]


def take_forward_hook(module: nn.Module, key: Any) -> None:
    """Unregister the forward hook ``key`` (what its ``RemovableHandle.remove()`` does)."""
    module._forward_hooks.pop(key, None)


def put_forward_hook(module: nn.Module, key: Any, hook: Any) -> None:
    """Register ``hook`` again under its old key, so the owner's handle still removes it."""
    module._forward_hooks[key] = hook


def checkpoint_reentrant(holder: nn.Module) -> bool:
    """Whether the gradient checkpointing that ``holder``'s flag switches is torch's reentrant kind.

    transformers >= 4.35 store ``functools.partial(checkpoint, **gradient_checkpointing_kwargs)`` as
    ``_gradient_checkpointing_func`` (4.35 .. 4.57 default ``use_reentrant=True``, 5.x ``False``);
    < 4.35 call ``torch.utils.checkpoint.checkpoint`` without ``use_reentrant``, which is reentrant on
    every torch this package supports (1.13 .. 2.13).  An unknown function counts as reentrant: that
    is the kind that needs a leaf input, and a leaf is correct for either kind.
    """
    func = getattr(holder, "_gradient_checkpointing_func", None)
    if func is None:
        return True
    keywords = getattr(func, "keywords", None)
    if not isinstance(keywords, dict):
        return True
    return keywords.get("use_reentrant", True) is not False


# transformers 4.35 .. 4.51 T5-family stacks (t5, mt5, umt5, longt5, switch_transformers, ...) checkpoint
# ``layer_module.forward`` instead of the module: the blocks' forward hooks do not run under checkpointing.
_CHECKPOINTS_FORWARD = re.compile(r"_gradient_checkpointing_func\(\s*[\w.]+\.forward\s*,")
_SKIPS_HOOKS: Dict[type, bool] = {}


def checkpointing_skips_layer_hooks(stack_parent: nn.Module) -> bool:
    """Whether ``stack_parent`` (the module that loops over a layer stack) calls the layers' ``forward``
    directly when it checkpoints them, so their forward hooks do not run (transformers 4.35 .. 4.51,
    T5 family); everywhere else the checkpointed call is ``layer(...)`` / ``layer.__call__``.
    """
    cls = type(stack_parent)
    if cls not in _SKIPS_HOOKS:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):  # pragma: no cover - source not available (frozen app)
            source = ""
        _SKIPS_HOOKS[cls] = bool(_CHECKPOINTS_FORWARD.search(source))
    return _SKIPS_HOOKS[cls]


def checkpointing_flag_holder(model: nn.Module, stack_path: str, index: int) -> Optional[nn.Module]:
    """The module whose ``gradient_checkpointing`` flag decides whether layer ``index`` is checkpointed.

    The layer itself from transformers 4.52 (``GradientCheckpointingLayer``); before, the module that
    loops over the stack (or an ancestor of it).
    """
    flag = "gradient_checkpointing"
    layer = model.get_submodule(f"{stack_path}.{index}")
    if hasattr(layer, flag):
        return layer
    parts = stack_path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:cut])) if cut else model
        if hasattr(module, flag):
            return module
    return None


def enable_gradient_checkpointing(model: nn.Module, reentrant: bool = True) -> bool:
    """Turn on transformers' gradient checkpointing of the given kind on a base model.

    transformers 5.x: ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` is a
    deprecated alias); 4.35 .. 4.57: ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=)``;
    < 4.35: no arguments, always reentrant.  Returns False (and changes nothing) where the installed
    transformers cannot do the requested kind.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    keyword = "activation_checkpointing_kwargs"
    if enable is None:
        enable = model.gradient_checkpointing_enable
        keyword = "gradient_checkpointing_kwargs"
    if keyword not in inspect.signature(enable).parameters:
        if not reentrant:
            return False
        enable()
        return True
    enable(**{keyword: {"use_reentrant": bool(reentrant)}})
    return True
