"""python -m train [--config FILE | --preset NAME] [--set key=value ...]

Prints the resolved config, trains with a progress bar, evaluates, and writes checkpoints,
TensorBoard logs and metrics.jsonl under the run directory (runs/<name> unless run_dir is set).
Rerunning the same command resumes from the newest checkpoint. Multi-host: pass
--coordinator_address/--num_processes/--process_id (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed to let JAX detect the cluster.
--compile_for TARGET compiles the run's train step for a pod (v5e:4x4, h100x8...) without one
and reports memory, FLOPs and collectives instead of training (train/compile_for.py).
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Sequence

import configs
from configs.base import ConfigError


def _epilog() -> str:
    rows = configs.schema(configs.PRESETS[configs.DEFAULT_PRESET]())
    width = max(len(k) for k, _, _ in rows)
    keys = "\n".join(f"  {k:<{width}}  {t:<11} {v!r}" for k, t, v in rows)
    return ("presets: " + ", ".join(sorted(configs.PRESETS)) +
            "\n\nexamples:\n  python -m train --config configs/mqar.py --set model.mixer=s5 "
            "--set optim.steps=200\n  python -m train --preset delayed_recall_s5 --steps 500   "
            "(--NAME VALUE: a key's last part, when unique)\n\n"
            f"config keys (type, default of {configs.DEFAULT_PRESET}):\n{keys}")


def _short_sets(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--steps 500` / `--steps=500` -> "optim.steps=500" when the leaf name is unique."""
    table, sets, i = configs.short_keys(), [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--"):
            parser.error(f"unexpected argument {item!r}")
        name, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra):
                parser.error(f"--{name} needs a value")
            value, i = extra[i + 1], i + 1
        keys = table.get(name)
        if not keys:
            close = difflib.get_close_matches(name, list(table), n=1)
            parser.error(f"unknown option --{name}" + (f"; did you mean --{close[0]}?" if close
                                                       else "; see --help for the config keys"))
        if len(keys) > 1:
            parser.error(f"--{name} is ambiguous ({', '.join(keys)}); use --set KEY=VALUE")
        sets.append(f"{keys[0]}={value}")
        i += 1
    return sets


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=_epilog())
    parser.add_argument("--config", help="a python file defining get_config()")
    parser.add_argument("--preset", help=f"a named preset (default {configs.DEFAULT_PRESET})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. optim.steps=200 (repeatable)")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved config and exit")
    parser.add_argument("--compile_for", metavar="TARGET",
                        help="compile the sharded train step for a pod topology without the "
                             "hardware (e.g. v5e:4x4, v5e:2x2, h100x8) and print per-device "
                             "memory, FLOPs per step and collectives; exit 1 when it does not fit "
                             "(train/compile_for.py; reads no data)")
    parser.add_argument("--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
    parser.add_argument("--num_processes", type=int,
                        default=_env_int("JAX_NUM_PROCESSES"))
    parser.add_argument("--process_id", type=int, default=_env_int("JAX_PROCESS_ID"))
    parser.add_argument("--distributed", action="store_true",
                        help="jax.distributed.initialize() with cluster auto-detection")
    args, extra = parser.parse_known_args(argv)
    args.set = _short_sets(extra, parser) + args.set  # explicit --set wins
    return args


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
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.split("=", 1)[0] == "--compile_for" for a in argv):
        # Before anything starts JAX's backends (building the --help text does): compile-only
        # devices need no local accelerator, and the CUDA plugin started as a backend would try
        # to open a GPU (and fail without cuDNN).
        import jax
        if not os.environ.get("JAX_PLATFORMS"):
            jax.config.update("jax_platforms", "cpu")   # read from the environment at import
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
    if args.compile_for:
        from train import compile_for
        try:
            return compile_for.main(config, args.compile_for)
        except (ConfigError, ValueError) as err:
            print(f"python -m train: error: {err}", file=sys.stderr)
            return 2
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
