"""`load_model` / `load_teacher` / `load_named_model`: names, YAML configs and checkpoints to `AtomisticModel`s.

Names: "chgnet" (pretrained, offline), "emt", "ase:module:Class", a config in
configs/models/ ("gemnet-oc", "painn-big", "painn-small", "schnet" and their
"-tiny" test variants) or a path to such a YAML file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from kdaug.errors import KdaugError
from kdaug.models.protocol import AtomisticModel
from kdaug.resources import resource_path

CONFIG_DIR = resource_path("models")



def check_device(device: str | torch.device) -> torch.device:
    """`--device` as a torch.device: cpu, cuda or cuda:N, and cuda only where a GPU is; a one-line error otherwise."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        msg = f"--device {device}: expected cpu, cuda or cuda:N"
        raise KdaugError(msg)
    if parsed.type == "cuda" and not torch.cuda.is_available():
        msg = f"--device {device}: no CUDA device is available here (use --device cpu)"
        raise KdaugError(msg)
    return parsed


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yml"))


def read_model_config(name_or_path: str | os.PathLike) -> tuple[str, dict[str, Any], str]:
    """(fairchem registry name, constructor kwargs, display name) from a config name or YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yml"
        if not path.is_file():
            msg = (f"model {name_or_path!r}: unknown; expected chgnet, emt, ase:module:Class, "
                   f"a YAML path or one of {', '.join(available_configs())}")
            raise KdaugError(msg)
    if not path.is_file():
        msg = f"model config {path}: no such file"
        raise KdaugError(msg)
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict) or "name" not in config or not isinstance(config.get("model", {}), dict):
        msg = f"model config {path}: expected keys 'name' (fairchem model) and 'model' (its arguments)"
        raise KdaugError(msg)
    return config["name"], dict(config.get("model") or {}), path.stem


def load_model(
    name_or_config: str | os.PathLike | None,
    checkpoint: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
) -> AtomisticModel:
    """Build a model by name or config, load `checkpoint` if given, move it to `device`, eval mode.

    With `name_or_config=None` the config stored in the checkpoint is used.
    """
    from kdaug.models import ase_calc
    from kdaug.models.fairchem_v1 import (
        OC20_CHECKPOINTS_HINT,
        FairchemModel,
        build_fairchem_model,
        model_config_from_checkpoint,
    )

    check_device(device)
    name = str(name_or_config) if name_or_config is not None else None
    if name == "chgnet":
        from kdaug.models.chgnet import CHGNetModel

        model: AtomisticModel = CHGNetModel()
    elif name == "emt":
        model = ase_calc.emt()
    elif name is not None and name.startswith("ase:"):
        model = ase_calc.from_spec(name)
    else:
        if name is None:
            if checkpoint is None:
                msg = "a model needs a config name or a --checkpoint"
                raise KdaugError(msg)
            model_name, kwargs, display = model_config_from_checkpoint(checkpoint)
        else:
            model_name, kwargs, display = read_model_config(name)
            if checkpoint is not None and not Path(checkpoint).is_file():  # before a large model is built
                raise KdaugError(f"--checkpoint {checkpoint}: no such file. {OC20_CHECKPOINTS_HINT}")
        model = FairchemModel(build_fairchem_model(model_name, kwargs), model_name, kwargs, display)
        if checkpoint is not None:
            model.load_checkpoint(checkpoint)
    if checkpoint is not None and not model.weights_from_checkpoint:
        msg = f"--checkpoint {checkpoint}: model {model.name} takes no checkpoint"
        raise KdaugError(msg)
    return model.to(device).eval()


def load_teacher(
    name_or_config: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
) -> AtomisticModel:
    """Like `load_model`, but a GNN teacher must come with trained weights."""
    from kdaug.models.fairchem_v1 import OC20_CHECKPOINTS_HINT

    model = load_model(name_or_config, checkpoint, device=device)
    if model.checkpoint_sha256 is None and model.weights_from_checkpoint:
        msg = f"teacher {model.name} needs pretrained weights (--checkpoint). {OC20_CHECKPOINTS_HINT}"
        raise KdaugError(msg)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_named_model(flag: str, spec: str | os.PathLike, *, device: str | torch.device = "cpu") -> AtomisticModel:
    """A frozen model named on the command line by `flag`: a checkpoint file whose config it holds (the
    student.pt of kdaug train, a fairchem checkpoint) or a model with built-in weights (chgnet, emt,
    ase:module:Class). Anything else is one line naming `flag`."""
    text = str(spec)
    if Path(text).is_file():
        try:
            model = load_model(None, text, device=device)
        except KdaugError as err:
            detail = str(err).removeprefix(f"--checkpoint {text}: ")
            raise KdaugError(f"{flag} {text}: not a model checkpoint kdaug can load ({detail})") from err
    elif text in ("chgnet", "emt") or text.startswith("ase:"):
        model = load_model(text, device=device)
    else:
        msg = (f"{flag} {text}: no such checkpoint file (expected a model checkpoint such as the student.pt of "
               "kdaug train, or chgnet, emt, ase:module:Class)")
        raise KdaugError(msg)
    for param in model.parameters():
        param.requires_grad_(False)
    return model
