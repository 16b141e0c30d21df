"""Print a GPU run's figures in a few lines (the device call's output is short):

    python3 bench/gpu/summary.py gpu.json
"""
from __future__ import annotations

import json
import sys

SERVED = ("output_tok_s", "decode_batch", "decode_step_ms", "bandwidth_floor_ms", "fraction_of_floor",
          "host_ms_per_step", "overlapped_host_ms_per_step", "ttft_s", "itl_s", "preemptions",
          "peak_allocated_gib", "truncated")


def main(path: str) -> None:
    with open(path) as f:
        run = json.load(f)
    print("all_ok", run.get("all_ok"), "seconds", run.get("seconds"))
    for name, value in run.items():
        if isinstance(value, dict) and "error" in value:
            print(name, "ERROR", value["error"][-1500:])
        elif name in ("versions", "bandwidth"):
            print(name, json.dumps(value))
        elif name in ("kernels", "tiny_exact"):
            for row in value:
                print(name, {k: v for k, v in row.items() if k not in ("dtype",)})
        elif name.startswith("serve_8b"):
            print(name, {k: value.get(k) for k in SERVED})
            if value.get("steady"):
                print("  steady", value["steady"])
        elif name in ("a10", "sweep_24gb"):
            print(name, json.dumps(value)[:1500])


if __name__ == "__main__":
    main(sys.argv[1])
