"""How ``AutoModelForCausalLMWithValueHead.from_pretrained`` reads its arguments and a checkpoint folder.

TRL's keywords are sorted into the value head's (``summary_dropout_prob``, ...), PEFT's (``peft_config``,
``is_trainable``), the placement ones tether decides itself (``torch_dtype``, ``device_map``) and the rest, which go
to transformers' ``from_pretrained``. A saved value head is found where TRL or tether put it: inside
``model.safetensors`` (or its shards) as ``v_head.summary.*``, or in ``value_head.safetensors``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from tether.errors import TetherError
from tether.legacy.errors import LegacyValueError
from tether.models import DTYPES, check_logits, load_pretrained
from tether.passes import is_peft_model
from tether.sources import resolve

VALUE_HEAD_FILE = "value_head.safetensors"
HEAD_ARGS = ("summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy")
QUANTIZED = ("load_in_8bit", "load_in_4bit", "quantization_config")
PICKLE_CONVERSION = (
    "python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('pytorch_model.bin', "
    "weights_only=True), 'value_head.safetensors')\""
)


@dataclass
class LoadRequest:
    """``from_pretrained``'s keywords, sorted by who acts on them."""

    head: dict = field(default_factory=dict)
    peft_config: object = None
    is_trainable: bool = False
    dtype: object = None
    trust_remote_code: bool = False
    hf_kwargs: dict = field(default_factory=dict)

    @classmethod
    def split(cls, kwargs: dict) -> LoadRequest:
        """Sort ``kwargs``; a LegacyValueError for what tether cannot do (a one-line reason)."""
        kwargs = dict(kwargs)
        request = cls(head={k: kwargs.pop(k) for k in HEAD_ARGS if k in kwargs})
        request.peft_config = kwargs.pop("peft_config", None)
        request.is_trainable = bool(kwargs.pop("is_trainable", False))
        if kwargs.pop("reward_adapter", None) is not None:
            raise LegacyValueError(
                "from_pretrained: reward_adapter is not supported by tether; score responses with your reward model "
                "or function and pass the scores to PPOTrainer.step"
            )
        kwargs.pop("reward_adapter_name", None)
        dtypes = [kwargs.pop(k) for k in ("torch_dtype", "dtype") if k in kwargs]
        request.dtype = next((d for d in dtypes if d is not None), None)
        request.trust_remote_code = bool(kwargs.pop("trust_remote_code", False))
        check_device_map(kwargs.pop("device_map", None))
        for name in QUANTIZED:
            if kwargs.get(name):
                raise LegacyValueError(
                    f"from_pretrained: {name} is not supported: tether trains float32 or bfloat16 weights; load the "
                    "model unquantized (with peft_config for LoRA)"
                )
            kwargs.pop(name, None)
        if kwargs.get("use_safetensors", True) is False:
            raise LegacyValueError("from_pretrained: use_safetensors=False: tether reads safetensors weights only")
        kwargs.pop("use_safetensors", None)
        request.hf_kwargs = kwargs
        return request


def check_device_map(device_map) -> None:
    """tether puts each model on the trainer's one device: a map onto one device (or none) is accepted as a no-op,
    a model split over several devices (or offloaded to the CPU or disk) is refused."""
    if device_map is None:
        return
    if isinstance(device_map, str):
        spread = device_map != "sequential" and torch.cuda.device_count() > 1
        places = {device_map} if not spread else {"several"}
    elif isinstance(device_map, dict):
        places = {str(v) for v in device_map.values()}
    else:
        places = {str(device_map)}
    if len(places) > 1 or places & {"disk", "several"}:
        raise LegacyValueError(
            f"from_pretrained: device_map={device_map!r} spreads the model over several devices; tether runs each "
            "model whole on the trainer's device (accelerator_kwargs cpu=True for the CPU): leave device_map out"
        )


def torch_dtype(dtype, folder: Path | None) -> torch.dtype:
    """The dtype to load in: None is float32 (as TRL's transformers did), "auto" the checkpoint's own dtype."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        config = (
            json.loads((folder / "config.json").read_text()) if folder and (folder / "config.json").is_file() else {}
        )
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype.removeprefix("torch."))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LegacyValueError(f"from_pretrained: torch_dtype must be a floating torch dtype or 'auto', got {dtype!r}")
    return dtype


def load_language_model(path, request: LoadRequest) -> tuple[nn.Module, Path | None]:
    """The causal LM that ``path`` names (a module, a local folder, a ``.gguf`` file or a Hub repo id), wrapped in
    LoRA when asked; and the folder it was read from (None for a module)."""
    if isinstance(path, nn.Module):
        model = path
        if request.peft_config is not None and not is_peft_model(model):
            model = _add_adapter(model, request.peft_config)
        return model, None
    if not isinstance(path, (str, Path)):
        raise LegacyValueError(
            f"from_pretrained: expected a model folder, a Hub repo id or a causal-LM module, got {type(path).__name__}"
        )
    revision = request.hf_kwargs.pop("revision", None)
    if revision and not Path(path).expanduser().exists():  # a Hub repo: tether's resolver takes repo@revision
        path = f"{path}@{revision}"
    try:
        source = resolve(str(path), "policy", trust_remote_code=request.trust_remote_code)
    except TetherError as e:
        raise LegacyValueError(str(e)) from None
    folder = None if source.gguf_file else Path(source.folder)
    if folder is not None and (folder / "adapter_config.json").is_file():
        return _load_adapter_folder(folder, request), folder
    shown = str(folder) if folder is not None else str(path)
    dtype = torch_dtype(request.dtype, folder)
    try:
        model = load_pretrained(
            AutoModelForCausalLM, shown, "policy", dtype, request.trust_remote_code, **request.hf_kwargs
        )
        check_logits(model, f"policy '{shown}'")  # the trainer reads its logits from its head and trunk
    except TetherError as e:  # not a causal-LM folder, no weights, ...: a ValueError, as transformers raised
        raise LegacyValueError(str(e)) from None
    if request.peft_config is not None:
        model = _add_adapter(model, request.peft_config)
    return model, folder


def _add_adapter(model: nn.Module, peft_config) -> nn.Module:
    """``model`` wrapped in a new adapter (``peft.get_peft_model``), as TRL did with ``peft_config``."""
    from peft import PeftConfig, get_peft_model

    if not isinstance(peft_config, PeftConfig):
        raise LegacyValueError(f"from_pretrained: peft_config must be a peft.PeftConfig, got {type(peft_config)}")
    _check_adapter_kind(peft_config)
    return get_peft_model(model, peft_config)


def _check_adapter_kind(peft_config) -> None:
    if getattr(peft_config, "is_prompt_learning", False):
        raise LegacyValueError("from_pretrained: prompt-learning adapters are not supported for PPO (as in TRL)")


def _load_adapter_folder(folder: Path, request: LoadRequest) -> nn.Module:
    """A trained adapter folder: its base model (``base_model_name_or_path``), then the adapter, trainable only with
    ``is_trainable=True`` (TRL's default is a frozen adapter)."""
    from peft import PeftConfig, PeftModel

    if request.peft_config is not None:
        warnings.warn(f"from_pretrained: peft_config ignored: {folder} holds a trained adapter", stacklevel=4)
    if not (folder / "adapter_model.safetensors").is_file():
        raise LegacyValueError(
            f"from_pretrained: {folder} has no adapter_model.safetensors (tether never reads pickle .bin files)"
        )
    config = PeftConfig.from_pretrained(str(folder))
    _check_adapter_kind(config)
    base_request = LoadRequest(
        dtype=request.dtype, trust_remote_code=request.trust_remote_code, hf_kwargs=request.hf_kwargs
    )
    base, _ = load_language_model(config.base_model_name_or_path, base_request)
    return PeftModel.from_pretrained(base, str(folder), is_trainable=request.is_trainable)


def saved_value_head(folder: Path) -> dict[str, torch.Tensor] | None:
    """The value head saved in ``folder`` as ``summary.*`` tensors: TRL's ``v_head.*`` keys inside the model's
    safetensors (or its shards), or tether's ``value_head.safetensors``; None when there is none. A head that could
    only be in a pickle file (TRL's PEFT checkpoints) is reported with a warning and not read."""
    if (folder / VALUE_HEAD_FILE).is_file():
        return _head_tensors(folder / VALUE_HEAD_FILE, every_key=True)
    files = []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({folder / f for k, f in weight_map.items() if "v_head." in k})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    state = {}
    for file in files:
        state.update(_head_tensors(file))
    if state:
        return state
    for name in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        if (folder / name).is_file():
            warnings.warn(
                f"AutoModelForCausalLMWithValueHead: {folder / name} may hold a TRL value head, but tether never "
                "reads pickle files, so the value head starts fresh; convert it in that folder with: "
                + PICKLE_CONVERSION,
                stacklevel=4,
            )
    return None


def _head_tensors(file: Path, every_key: bool = False) -> dict[str, torch.Tensor]:
    """The value-head tensors of one safetensors file, keyed ``summary.weight``/``summary.bias``."""
    state = {}
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            if "v_head." in key:
                state["summary." + key.split("v_head.", 1)[1].removeprefix("summary.")] = f.get_tensor(key)
            elif every_key:  # tether's earlier value_head.safetensors: the Linear's own "weight" and "bias"
                state["summary." + key.removeprefix("summary.")] = f.get_tensor(key)
    return state
