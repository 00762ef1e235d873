"""The command-line programs: `python train.py` (top level) and `deconvnet-train` (installed) run the same main."""
