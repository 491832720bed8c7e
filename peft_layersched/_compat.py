"""Every difference between PEFT/transformers/torch versions lives here.

The rest of the package reads as if there were one PEFT.  We detect features, not version numbers,
except where noted.  Facts per version: ``shared/reference/peft-versions.md``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Dict, Iterator, List

import peft
import torch
from peft import LoraConfig, PeftType
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
    """Insert ``SCHEDULED_LORA`` into every type mapping the installed PEFT has; idempotent.

    ``register_peft_method`` (PEFT >= 0.15) is not usable from outside PEFT: it requires a ``PeftType``
    member.  Inserting into the dicts is what it does.  Returns the dicts written, for diagnostics.
    """
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


def is_tuner_layer(module: nn.Module) -> bool:
    return isinstance(module, TUNER_LAYER_TYPES)


def is_lora_layer(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer)


def set_layer_bypassed(layer: nn.Module, bypassed: bool) -> None:
    """Per-layer bypass: the LoRA forward returns the base output only, with no dropout/RNG."""
    setattr(layer, _DISABLE_ATTR, bool(bypassed))


def layer_bypassed(layer: nn.Module) -> bool:
    return bool(getattr(layer, _DISABLE_ATTR, False))


def adapter_parameters(layer: nn.Module, adapter_name: str) -> Iterator[nn.Parameter]:
    """The LoRA parameters of ``adapter_name`` in one LoRA layer (A/B; embedding A/B; DoRA magnitude)."""
    for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
        container = getattr(layer, attr, None)
        if container is None or adapter_name not in container:
            continue
        item = container[adapter_name]
        if isinstance(item, nn.Parameter):
            yield item
        else:
            for param in item.parameters():
                yield param


def lora_config_fields() -> List[str]:
    return [f.name for f in dataclasses.fields(LoraConfig)]


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


def injection_args(method: str, args: tuple, kwargs: dict, default_model: nn.Module) -> Any:
    """(model, adapter_name) of a PEFT injection call.

    PEFT 0.3/0.4 inject through ``add_adapter(adapter_name, config=None)`` on ``self.model``;
    0.5+ through ``inject_adapter(model, adapter_name, ...)``.
    """
    if method == "add_adapter":
        name = args[0] if args else kwargs["adapter_name"]
        return default_model, name
    model = args[0] if args else kwargs["model"]
    name = args[1] if len(args) > 1 else kwargs["adapter_name"]
    return model, name


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
