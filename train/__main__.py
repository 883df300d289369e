"""python -m train [--config FILE | --preset NAME] [--set key=value ...]

Prints the resolved config, trains with a progress bar, evaluates, and writes checkpoints,
TensorBoard logs and metrics.jsonl under the run directory (runs/<name> unless run_dir is set).
Rerunning the same command resumes from the newest checkpoint. Multi-host: pass
--coordinator_address/--num_processes/--process_id (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed to let JAX detect the cluster.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import configs
from configs.base import ConfigError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="presets: " + ", ".join(sorted(configs.PRESETS)) +
                                     "\nexample: python -m train --config configs/mqar.py "
                                     "--set model.mixer=s5 --set optim.steps=200")
    parser.add_argument("--config", help="a python file defining get_config()")
    parser.add_argument("--preset", help=f"a named preset (default {configs.DEFAULT_PRESET})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. optim.steps=200 (repeatable)")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved config and exit")
    parser.add_argument("--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
    parser.add_argument("--num_processes", type=int,
                        default=_env_int("JAX_NUM_PROCESSES"))
    parser.add_argument("--process_id", type=int, default=_env_int("JAX_PROCESS_ID"))
    parser.add_argument("--distributed", action="store_true",
                        help="jax.distributed.initialize() with cluster auto-detection")
    return parser.parse_args(argv)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def initialize_distributed(args: argparse.Namespace) -> None:
    """Must run before anything touches a device: the process group defines jax.devices()."""
    import jax
    if args.coordinator_address or args.num_processes:
        if args.coordinator_address is None or args.num_processes is None \
                or args.process_id is None:
            raise ConfigError("multi-process runs need --coordinator_address, --num_processes "
                              "and --process_id together")
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes, process_id=args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = configs.resolve(args.config, args.preset, args.set)
    except ConfigError as err:
        print(f"python -m train: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import json
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    initialize_distributed(args)
    from train.checkpoint import CheckpointError
    from train.loop import run
    try:
        run(config)
    except (ConfigError, CheckpointError) as err:
        print(f"python -m train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
