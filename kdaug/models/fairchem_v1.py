"""fairchem v1 GNNs (GemNet-OC, PaiNN, SchNet) behind `AtomisticModel`, with KD taps.

Taps come from forward hooks on fairchem's own modules, registered only for a
forward that asks for them (no taps, no hooks):

| model     | node                        | atom_energy        | vector                  | edge                 |
| painn     | input of out_energy (N,H)   | out_energy (N,1)   | input of out_forces     | -                    |
| schnet    | input of lin1 (N,H)         | lin2 (N,1)         | -                       | -                    |
| gemnet_oc | out_mlp_E output x_E (N,256)| out_energy (N,1)   | -                       | out_mlp_F output x_F |

`layer_features` records the scalar node features after each of fairchem's interaction blocks
(PaiNN: message + update layer i, after its scale factor; SchNet: h + interactions[i](h);
GemNet-OC: h of int_blocks[i], then the aggregated x_E) through forward hooks as well, for CKA.

Energy, forces and the atom_energy tap leave through `output_transform` (`kdaug.models.output_transform`):
the normalizers and element references a fairchem checkpoint was trained with are undone inside forward,
so every caller gets eV and eV/A, as fairchem's `OCPCalculator` does. Without them the outputs are the raw ones.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch_geometric.data import Batch

from kdaug.data.run_record import sha256_of
from kdaug.errors import KdaugError
from kdaug.models.graph_cache import GraphCache
from kdaug.models.output_transform import OutputTransform
from kdaug.models.protocol import AtomisticModel, EdgeFeatures, ModelOutput

# (module attribute, what to record): "input0"/"input1" = positional input, "output" = output.
_TAP_SITES: dict[str, dict[str, tuple[str, str]]] = {
    "painn": {"node": ("out_energy", "input0"), "atom_energy": ("out_energy", "output"),
              "vector": ("out_forces", "input1")},
    "schnet": {"node": ("lin1", "input0"), "atom_energy": ("lin2", "output")},
    "gemnet_oc": {"node": ("out_mlp_E", "output"), "atom_energy": ("out_energy", "output"),
                  "edge": ("out_mlp_F", "output")},
}
# Per-layer node features: (name, module attribute, what to record) per interaction block; "output0" =
# first element of the output tuple, "input0+output" = residual input plus the block's output.
_LAYER_SITES: dict[str, Callable[[nn.Module], list[tuple[str, str, str]]]] = {
    "painn": lambda m: [(f"layer{i}", f"upd_out_scalar_scale_{i}", "output") for i in range(m.num_layers)],
    "schnet": lambda m: [(f"layer{i}", f"interactions.{i}", "input0+output") for i in range(len(m.interactions))],
    "gemnet_oc": lambda m: [*((f"layer{i}", f"int_blocks.{i}", "output0") for i in range(m.num_blocks)),
                            ("x_E", "out_mlp_E", "output")],
}
# The layer holding each model's "node" and "vector" KD taps (the distilled layer in CKA maps).
_TAP_LAYER: dict[str, Callable[[nn.Module], str]] = {
    "painn": lambda m: f"layer{m.num_layers - 1}",
    "schnet": lambda m: f"layer{len(m.interactions) - 1}",
    "gemnet_oc": lambda m: "x_E",
}
_SINGLE_GRAPH = ("painn", "schnet")  # models whose forward builds one radius graph, with the module's cutoff
CACHED_STRUCTURES = 16384  # graphs kept by cache_graphs (about 20 kB each for 80 atoms)
_N_ELEMENTS = {"painn": 83, "gemnet_oc": 83, "schnet": 99}
OC20_CHECKPOINTS_HINT = (
    "OC20 checkpoints are published by fairchem (see fairchem.core.models.model_registry"
    ".available_pretrained_models, e.g. 'GemNet-OC-S2EF-OC20-All'); download one on a machine "
    "with internet and pass its path with --checkpoint"
)


def build_fairchem_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate fairchem's registered model class `name` with `kwargs`."""
    import fairchem.core.models.gemnet_oc.gemnet_oc
    import fairchem.core.models.painn.painn
    import fairchem.core.models.schnet  # noqa: F401  (these imports register the classes)
    from fairchem.core.common.registry import registry

    if name not in _TAP_SITES:
        msg = f"model name {name!r}: expected one of {', '.join(sorted(_TAP_SITES))}"
        raise KdaugError(msg)
    kwargs = dict(kwargs)
    kwargs["otf_graph"] = True  # our LMDBs store no edges
    try:
        return registry.get_model_class(name)(**kwargs)
    except TypeError as err:
        msg = f"model config for {name}: {err}"
        raise KdaugError(msg) from err


class FairchemModel(AtomisticModel):
    """Adapter over a fairchem v1 model instance (weights from fairchem or kdaug checkpoints).

    Args:
        module: the fairchem model (e.g. `fairchem.core.models.painn.PaiNN`).
        model_name: fairchem registry name ("painn", "schnet", "gemnet_oc").
        model_kwargs: constructor arguments (saved with checkpoints).
        name: display name (e.g. "painn-small").

    Attributes:
        output_transform: normalizers and element references applied to the module's outputs
            (identity until a checkpoint or `kdaug train` sets them); its buffers are in `state_dict`.
    """

    weights_from_checkpoint = True

    def __init__(self, module: nn.Module, model_name: str, model_kwargs: dict[str, Any], name: str) -> None:
        super().__init__()
        self.module = module
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs)
        self.name = name
        sites = dict(_TAP_SITES[model_name])
        if model_name == "painn" and not getattr(module, "direct_forces", False):
            sites.pop("vector")  # out_forces only exists with direct forces
        self._sites = sites
        self.implemented_taps = frozenset(sites)
        self.supported_elements = frozenset(range(1, _N_ELEMENTS[model_name] + 1))
        self.output_transform = OutputTransform()
        self.atom_energy_sums_to_energy = getattr(module, "extensive", True)  # GemNet-OC may average instead
        # PaiNN and SchNet read one periodic graph with the module's cutoff: built per structure here
        # (GemNet-OC builds several graphs of its own)
        self.graph_cache = (GraphCache(module.cutoff, module.max_neighbors,
                                       getattr(module, "enforce_max_neighbors_strictly", True))
                            if model_name in _SINGLE_GRAPH and module.use_pbc else None)

    def cache_graphs(self) -> None:
        """Keep each structure's radius graph (`kdaug.models.graph_cache`) for the next call on it."""
        if self.graph_cache is not None:
            self.graph_cache.max_structures = CACHED_STRUCTURES

    @property
    def conservative(self) -> bool:
        """Gradient forces, and a transform that scales energy and forces alike (fairchem applies a
        checkpoint's normalizers even where they differ; then the forces are no longer -dE/dpos)."""
        return not getattr(self.module, "direct_forces", False) and self.output_transform.keeps_forces_conservative

    @contextlib.contextmanager
    def _recording(self, taps: tuple[str, ...]) -> Iterator[dict[str, Any]]:
        recorded: dict[str, Any] = {}
        handles = []

        def hook_for(tap: str, what: str) -> Callable:
            if what == "output":
                return lambda _m, _args, out: recorded.__setitem__(tap, out)
            index = int(what[-1])
            return lambda _m, args: recorded.__setitem__(tap, args[index])

        for tap in taps:
            attribute, what = self._sites[tap]
            module = getattr(self.module, attribute)
            hook = hook_for(tap, what)
            handles.append(module.register_forward_hook(hook) if what == "output"
                           else module.register_forward_pre_hook(hook))
        original = None
        if "edge" in taps:  # GemNet-OC's edge index/vectors live in its main graph dict
            original = self.module.get_graphs_and_indices

            def graphs_and_indices(data: Batch) -> tuple:
                graphs = original(data)
                recorded["main_graph"] = graphs[0]
                return graphs

            self.module.get_graphs_and_indices = graphs_and_indices
        try:
            yield recorded
        finally:
            for handle in handles:
                handle.remove()
            if original is not None:
                del self.module.get_graphs_and_indices

    @contextlib.contextmanager
    def _graph_given(self, given: bool) -> Iterator[None]:
        """fairchem reads batch.edge_index, cell_offsets and neighbors instead of building the graph."""
        if not given:
            yield
            return
        self.module.otf_graph = False
        try:
            yield
        finally:
            self.module.otf_graph = True

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Names of the interaction-block outputs `layer_features` returns, input to output."""
        return tuple(name for name, _, _ in _LAYER_SITES[self.model_name](self.module))

    def tap_layer(self, tap: str) -> str | None:
        """The layer of `layer_names` a KD tap reads ("node", "vector"); None for other taps."""
        if tap not in ("node", "vector") or tap not in self.implemented_taps:
            return None
        return _TAP_LAYER[self.model_name](self.module)

    def layer_features(self, batch: Batch) -> dict[str, torch.Tensor]:
        """{layer name: (N, D) detached scalar node features after that interaction block} for `batch`."""
        recorded: dict[str, torch.Tensor] = {}

        def hook_for(name: str, what: str) -> Callable:
            def hook(_module, args, out) -> None:
                value = out[0] if what == "output0" else out
                recorded[name] = (args[0] + value if what == "input0+output" else value).detach()
            return hook

        handles = [self.module.get_submodule(attribute).register_forward_hook(hook_for(name, what))
                   for name, attribute, what in _LAYER_SITES[self.model_name](self.module)]
        try:
            self(batch)
        finally:
            for handle in handles:
                handle.remove()
        return {name: recorded[name] for name in self.layer_names}

    def compute(self, batch: Batch, taps: tuple[str, ...]) -> ModelOutput:
        # fairchem's radius_graph_pbc only looks at enough cell images for wrapped
        # positions (AtomsToGraphs wraps); wrapping shifts by lattice vectors, so
        # forces and gradients are unchanged.
        batch = batch.clone()
        batch.pos = wrap_positions(batch.pos, batch.cell, batch.batch)
        if self.graph_cache is not None:
            batch.edge_index, batch.cell_offsets, batch.neighbors = self.graph_cache.graph(batch)
        with self._recording(taps) as recorded, self._graph_given(self.graph_cache is not None):
            out = self.module(batch)
        transform = self.output_transform
        result = {}
        for tap in taps:
            value = recorded[tap]
            if tap == "atom_energy":
                value = transform.atom_energy_out(value.view(-1), batch)
            elif tap == "edge":
                graph = recorded["main_graph"]
                value = EdgeFeatures(features=value, edge_index=graph["edge_index"], vectors=graph["vector"])
            result[tap] = value
        return ModelOutput(energy=transform.energy_out(out["energy"].view(-1), batch),
                           forces=transform.forces_out(out["forces"]), taps=result)

    # -- checkpoints -----------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write a fairchem-style checkpoint: config["model"] + model_attributes, a `module.` state dict,
        and the output transform as fairchem's "normalizers" and "elementrefs"."""
        state = {f"module.{key}": value for key, value in self.module.state_dict().items()}
        config = {"model": self.model_name, "model_attributes": self.model_kwargs, "kdaug_name": self.name}
        torch.save({"state_dict": state, "config": config, **self.output_transform.checkpoint_entries()}, path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a fairchem v1 checkpoint: strips `module.` prefixes, prefers EMA weights, applies legacy
        GemNet-OC scale factors and the checkpoint's normalizers and element references; names the
        mismatched keys otherwise."""
        checkpoint = read_checkpoint(path)
        state = {_strip_module(key): value for key, value in checkpoint.get("state_dict", checkpoint).items()}
        own = self.module.state_dict()
        legacy_scales = checkpoint.get("scale_dict")
        if legacy_scales:  # older GemNet-OC checkpoints keep fitted scale factors beside the weights
            state.update({k: v for k, v in own.items() if k.endswith(".scale_factor") and k not in state})
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong_shape:
            parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                     for label, keys in (("missing", missing), ("unexpected", unexpected),
                                         ("wrong shape", wrong_shape)) if keys]
            msg = f"checkpoint {path} does not fit model config {self.name} ({'; '.join(parts)})"
            raise KdaugError(msg)
        self.module.load_state_dict(state)
        ema = checkpoint.get("ema")
        if ema and ema.get("shadow_params"):
            trainable = [p for p in self.module.parameters() if p.requires_grad]
            shadows = ema["shadow_params"]
            if len(shadows) != len(trainable) or any(s.shape != p.shape for s, p in zip(shadows, trainable)):
                msg = f"checkpoint {path}: EMA weights do not fit model config {self.name}"
                raise KdaugError(msg)
            with torch.no_grad():
                for param, shadow in zip(trainable, shadows):
                    param.copy_(shadow)
        if legacy_scales:
            from fairchem.core.modules.scaling.compat import load_scales_compat

            try:
                load_scales_compat(self.module, legacy_scales)
            except ValueError as err:
                msg = f"checkpoint {path}: its scale_dict does not fit model config {self.name} ({err.args[1]})"
                raise KdaugError(msg) from err
        self.output_transform.load_checkpoint_entries(checkpoint, str(path))
        self.checkpoint_sha256 = sha256_of(path)


def wrap_positions(pos: torch.Tensor, cell: torch.Tensor, system_idx: torch.Tensor) -> torch.Tensor:
    """(N,3) positions moved by whole lattice vectors into their cell (differentiable in pos)."""
    atom_cell = cell[system_idx]
    frac = torch.linalg.solve(atom_cell.transpose(1, 2), pos.unsqueeze(-1)).squeeze(-1)
    shift = torch.floor(frac).detach()
    return pos - torch.einsum("nj,nji->ni", shift, atom_cell)


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        msg = f"--checkpoint {path}: no such file. {OC20_CHECKPOINTS_HINT}"
        raise KdaugError(msg)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch.load raises many kinds for a file that is not a checkpoint
        msg = f"--checkpoint {path}: not a torch checkpoint ({type(err).__name__})"
        raise KdaugError(msg) from err
    if not isinstance(checkpoint, dict):
        msg = f"--checkpoint {path}: expected a dict with a state_dict, got {type(checkpoint).__name__}"
        raise KdaugError(msg)
    return checkpoint


def model_config_from_checkpoint(path: str | os.PathLike) -> tuple[str, dict[str, Any], str]:
    """(fairchem name, kwargs, display name) stored in a fairchem checkpoint's config."""
    config = read_checkpoint(path).get("config") or {}
    model = config.get("model")
    if isinstance(model, dict):  # newer layout: {"name": ..., **kwargs}
        kwargs = {k: v for k, v in model.items() if k != "name"}
        name = model.get("name")
    else:
        name, kwargs = model, dict(config.get("model_attributes") or {})
    if not name:
        msg = f"--checkpoint {path}: has no model config; pass the model config too"
        raise KdaugError(msg)
    return name, kwargs, config.get("kdaug_name", name)
