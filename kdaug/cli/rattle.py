"""`kdaug rattle --input PATH --teacher T --sigma 0.05 --out PATH`: noisy copies labelled by the teacher."""

from __future__ import annotations

import argparse
import json

from kdaug.config import add_config_arguments, build_config
from kdaug.perturb.rattle import RattleConfig, run_rattle

# Help for the options every perturbation generator shares (kdaug.perturb.common.PerturbOptions).
PERTURB_HELP = {
    "input": "frame LMDB (file or directory of shards): OC20 S2EF, d1M or kdaug output",
    "out": "output directory (resumed if it holds a previous run)",
    "teacher": "chgnet, emt, ase:module:Class, or a model config with --checkpoint",
    "checkpoint": "teacher checkpoint",
    "device": "cpu or cuda",
    "fraction": "fraction of the input frames to use",
    "min_distance_factor": "reject frames with two atoms closer than this x their covalent-radius sum",
    "seed": "random seed",
    "batch_size": "frames per forward",
}
HELP = {
    **PERTURB_HELP,
    "sigma": "standard deviation of the noise on each coordinate of free atoms, Angstrom",
    "copies": "perturbed copies per input frame",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, RattleConfig, HELP)


def run(args: argparse.Namespace) -> None:
    print(json.dumps(run_rattle(build_config(RattleConfig, args))))
