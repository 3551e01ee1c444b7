"""``python launch/entry.py WORKDIR VERB CONFIG [overrides...]``: chdir, then ``sppd-megatron VERB ...``.

nemo-run starts jobs inside its own job directory; recipes name their data and run directories
relative to the project root, so every launched task first moves to WORKDIR (the project root on a
shared filesystem, or inside the container).
"""

import os
import sys

if __name__ == "__main__":  # dist_checkpointing's writer process re-imports the main module
    workdir, *rest = sys.argv[1:]
    os.chdir(workdir)
    sys.path.insert(0, workdir)
    from sppd_megatron.cli import main

    raise SystemExit(main(rest))
