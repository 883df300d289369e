"""HiPPO's online function approximation (Gu et al., 2020, section 4 / appendix F): the
reconstruction error of a signal's history from the memory's final state, for each measure and
state size, as in the paper's function-approximation experiment on band-limited white noise.

Nothing here is trained: the memory is the fixed (A, B) of memzoo.ssm.hippo, discretised
(bilinear) and run over the signal in float64; the error is that of the projection the final
state encodes, so this is a script, not a training-command run.

    python -m benchmarks.hippo_reconstruction                 # the table in RESULTS.md
    python -m benchmarks.hippo_reconstruction --sizes 8,16 --seeds 2 --length 1024

Signals: white noise, low-passed in the Fourier domain to `cutoff` cycles over the whole length,
scaled to unit RMS; `seeds` of them. Each measure is scored over what it claims to remember, in
its own coordinate (memzoo.ssm.hippo.evaluation_matrix):
  legs  the whole history [0, t], uniformly (x = s / t)
  legt  the last `window` tokens, uniformly (theta = window)
  fout  the last `window` tokens, uniformly (dt = 1 / window: the unit window [t - 1, t])
  lagt  the whole history weighted by its measure exp(-lag / lag_scale) (dt = 1 / lag_scale)
Error: relative MSE, sum w (rec - f)^2 / sum w f^2 (w the measure's weight), averaged over seeds.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from memzoo.ssm import hippo
from pallas_kernels._testing import float64_run

SIZES = (8, 16, 32, 64, 128)


def band_limited_noise(seed: int, length: int, cutoff: int) -> np.ndarray:
    """White noise with every Fourier component above `cutoff` cycles per length removed,
    unit RMS."""
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(length))
    spectrum[cutoff + 1:] = 0.0
    signal = np.fft.irfft(spectrum, n=length)
    return signal / np.sqrt(np.mean(signal ** 2))


def reconstruction_error(measure: str, state_size: int, signals: np.ndarray, *, window: int,
                         lag_scale: float) -> float:
    """Mean relative MSE of the history reconstructed from the final state; signals [b, t]."""
    length = signals.shape[1]
    if measure == "legs":
        op = hippo.HippoOperator.build("legs", state_size)
        points = np.arange(length)                      # token s, evaluated at x = s / t
        x = (points + 1) / length
        ref = signals
        weight = np.ones(length)
    elif measure in ("legt", "fout"):
        kw = dict(theta=float(window)) if measure == "legt" else dict(dt=1.0 / window)
        op = hippo.HippoOperator.build(measure, state_size, **kw)
        lag = np.arange(window)                         # tokens back from the last
        # legt: r = lag / theta (0 is now); fout: x in [0, 1) over [t - 1, t] (1 is now)
        x = lag / window if measure == "legt" else 1.0 - lag / window
        ref = signals[:, length - 1 - lag]
        weight = np.ones(window)
    elif measure == "lagt":
        op = hippo.HippoOperator.build("lagt", state_size, dt=1.0 / lag_scale)
        lag = np.arange(length)
        x = lag / lag_scale
        ref = signals[:, length - 1 - lag]
        weight = np.exp(-x)
    else:
        raise ValueError(f"measure must be one of {hippo.MEASURES}, got {measure!r}")
    run = jax.jit(lambda f: hippo.run_memory(op, f, dtype=jnp.float64)[:, -1])
    c = float64_run(run, jnp.asarray(signals))                  # [b, n]
    rec = c @ hippo.evaluation_matrix(measure, state_size, x).T  # [b, points]
    err = np.sum(weight * (rec - ref) ** 2, axis=1) / np.sum(weight * ref ** 2, axis=1)
    return float(np.mean(err))


def table(sizes=SIZES, *, seeds: int = 4, length: int = 2048, cutoff: int = 32,
          window: int = 512, lag_scale: float = 128.0) -> dict[str, dict[int, float]]:
    signals = np.stack([band_limited_noise(s, length, cutoff) for s in range(seeds)])
    return {measure: {n: reconstruction_error(measure, n, signals, window=window,
                                              lag_scale=lag_scale) for n in sizes}
            for measure in ("legs", "legt", "lagt", "fout")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--cutoff", type=int, default=32, help="cycles over the whole length")
    parser.add_argument("--window", type=int, default=512, help="legt / fout window, tokens")
    parser.add_argument("--lag_scale", type=float, default=128.0, help="lagt: exp(-lag / this)")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    sizes = tuple(int(v) for v in args.sizes.split(","))
    result = table(sizes, seeds=args.seeds, length=args.length, cutoff=args.cutoff,
                   window=args.window, lag_scale=args.lag_scale)
    print("| measure | " + " | ".join(f"N={n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for measure, row in result.items():
        print(f"| {measure} | " + " | ".join(f"{row[n]:.2e}" for n in sizes) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "relative_mse": result}, fh, indent=1)


if __name__ == "__main__":
    main()
