"""`kdaug generate`: sample adsorbate+slab systems, relax them with a teacher, write frame LMDBs."""

from __future__ import annotations

import argparse
import json

from kdaug.config import add_config_arguments, build_config
from kdaug.generate import GenerateConfig, run_generate

HELP = {
    "n_systems": "number of systems in the whole dataset (all shards)",
    "out": "output directory (resumed if it holds a previous run)",
    "teacher": "chgnet, emt, ase:module:Class, or a model config (e.g. gemnet-oc) with --checkpoint",
    "checkpoint": "teacher checkpoint (fairchem OC20 format)",
    "device": "cpu or cuda",
    "seed": "system i is drawn from a generator seeded by (seed, i)",
    "bulk_db": "OC20-format bulks.pkl (default: data/bulks.pkl)",
    "adsorbate_ids": "fairchem-data-oc adsorbate ids to draw from (default: all the teacher supports)",
    "placement": "fairchem-data-oc placement mode",
    "max_miller": "largest Miller index of sampled slabs",
    "optimizer": "fire or lbfgs",
    "fmax": "convergence threshold on free-atom forces, eV/A",
    "max_steps": "optimizer steps per system at most",
    "frame_fraction": "probability of keeping each relaxation frame",
    "max_systems_per_batch": "systems per teacher forward at most (default: 1 on CPU, 32 on CUDA)",
    "max_atoms_per_batch": "atoms per teacher forward at most",
    "num_workers": "sampling processes running ahead of the relaxer (0: in-process)",
    "num_shards": "split system ids over this many shards (default: torchrun/SLURM env, else 1)",
    "shard_index": "this process's shard",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, GenerateConfig, HELP)


def run(args: argparse.Namespace) -> None:
    summary = run_generate(build_config(GenerateConfig, args))
    print(json.dumps(summary))
