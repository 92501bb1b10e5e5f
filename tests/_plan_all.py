"""Test helper: plan every method's smoke config on a small TPU topology in ONE process (one
libtpu load, one mesh) and write the plans as JSON: ``python tests/_plan_all.py OUT.json``.

Runs in a subprocess of tests/test_plan.py (libtpu and the test process's float64 / fake
CPU devices stay apart). Each method: train and eval step, 1 example per chip, 32 px crops.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from rwseg import configs  # noqa: E402
from rwseg.train import plan  # noqa: E402

TOPOLOGY = "v5e:2x2"


def main(out: str) -> None:
    mesh = plan.topology_mesh(TOPOLOGY)
    result = {}
    for method in configs.NAMES:
        p = plan.plan_config(configs.get_config(method, "smoke"), TOPOLOGY, batch_per_chip=1, crop=32, mesh=mesh)
        row = dataclasses.asdict(p)
        row["table"] = plan.format_plan(p)
        result[method] = row
        print(method, [round(s.compile_seconds, 1) for s in p.steps], flush=True)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
