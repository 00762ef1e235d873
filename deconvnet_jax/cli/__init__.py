"""The command-line programs: `python train.py` (top level) and `deconvnet-train` (installed) run the same main.

Importing this package sets glibc's malloc to reuse freed memory (`host_memory`), before any program here imports
JAX: XLA's CPU backend then stops faulting in fresh pages on every step. `DECONVNET_MALLOC=system` opts out.
"""

from deconvnet_jax.host_memory import reuse_freed_memory

reuse_freed_memory()
