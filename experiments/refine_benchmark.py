"""The refinement benchmark of issue 12 (one command): see rwseg/refine_benchmark.py.

    PYTHONPATH=. python experiments/refine_benchmark.py --base /work/runs/realdata/r02_c224_aspp12 \
        --steps 100 --seeds 0 --methods spn,rwn,gcrf,dilated --out /work/runs/realdata/refine
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rwseg.refine_benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_config=pathlib.Path(__file__).resolve().parent / "configs" / "stanford_refine.py"))
