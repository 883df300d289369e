"""`python -m benchmarks [names...]`: see benchmarks/harness.py."""
import sys

from benchmarks.harness import main

sys.exit(main())
