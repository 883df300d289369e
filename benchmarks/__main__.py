"""`python -m benchmarks [names...]`: see benchmarks/harness.py.

`python -m benchmarks compile [...]`: the compile matrix for real TPUs and GPUs (benchmarks/compile.py).
"""
import os
import sys

if sys.argv[1:2] == ["compile"]:
    # Compile-only devices: no accelerator is opened (set before JAX reads its configuration).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from benchmarks.compile import main as compile_main
    sys.exit(compile_main(sys.argv[2:]))

from benchmarks.harness import main

sys.exit(main())
