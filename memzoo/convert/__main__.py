"""python -m memzoo.convert: load a reference checkpoint into memzoo, check it, write it back.

    python -m memzoo.convert CHECKPOINT_DIR                  what it is, and a forward pass
    python -m memzoo.convert CHECKPOINT_DIR --out OUT_DIR    ... then written back (same format)
    python -m memzoo.convert CHECKPOINT_DIR --tokens 1,2,3   logits of these tokens' last position

Exit status 2 with the error (naming the file, tensor key or config field) when the checkpoint
cannot be converted.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memzoo.convert",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="directory with config.json and model.safetensors "
                                           "or pytorch_model.bin")
    parser.add_argument("--format", default=None, help="force a format (default: detected "
                                                        "from config.json)")
    parser.add_argument("--out", default=None, help="write the converted model back here, in "
                                                    "the checkpoint's own format")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the dtype --out writes (bfloat16: model.safetensors, rounded)")
    parser.add_argument("--tokens", default="0,1,2,3", help="comma-separated token ids for the "
                                                            "check forward pass")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from memzoo.convert import ConversionError, detect_format, load_checkpoint, save_checkpoint
    try:
        start = time.perf_counter()
        model, config = load_checkpoint(args.checkpoint, format=args.format)
        name = args.format or detect_format(config)
        params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        layer = model.stack.layers[0] if model.stack.layers else None
        print(f"{args.checkpoint}: format {name}, mixer {getattr(layer, 'mixer_name', '?')}, "
              f"{len(model.stack.layers)} layers, vocab {model.vocab_size}, "
              f"{params:,} parameters (loaded in {time.perf_counter() - start:.1f} s)")
        try:
            tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
        except ValueError:
            raise ConversionError(f"--tokens must be comma-separated ints, got {args.tokens!r}")
        logits = np.asarray(model(jnp.asarray([tokens], jnp.int32)))[0, -1]
        top = np.argsort(-logits)[:5]
        print(f"logits at the last of {len(tokens)} tokens: top ids {top.tolist()}, "
              f"values {np.round(logits[top], 4).tolist()}")
        if args.out:
            file = save_checkpoint(model, config, args.out, format=name, dtype=args.dtype)
            print(f"wrote {file}")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
