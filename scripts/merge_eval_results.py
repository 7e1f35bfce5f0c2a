"""Merge `python -m mlx_longheads.eval` results folders into one, each sample once.

usage: python scripts/merge_eval_results.py SOURCE [SOURCE ...] DESTINATION

Runs that went in parallel (scripts/eval_parallel.sh) or one after another each wrote
their own folder; a sample (task, method, length, index) already in DESTINATION, or in
an earlier SOURCE, is not added again. Results of another model or seed are refused.
"""

import json
import sys
from pathlib import Path

IDENTITY = ("task", "method", "model", "seed")


def merge(sources, destination: Path) -> int:
    added = 0
    for source in sources:
        for path in sorted(Path(source).glob("*/*.jsonl")):
            target = destination / path.relative_to(source)
            known = {}
            if target.exists():
                known = {(r["length"], r["index"]): r for r in map(json.loads, target.read_text().splitlines())}
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("a") as out:
                for line in path.read_text().splitlines():
                    record = json.loads(line)
                    first = next(iter(known.values()), record)
                    if any(record[key] != first[key] for key in IDENTITY):
                        sys.exit(f"{path}: results of another {', '.join(IDENTITY)} than {target}")
                    key = (record["length"], record["index"])
                    if key in known and "skipped" not in known[key]:
                        continue
                    known[key] = record
                    out.write(json.dumps(record) + "\n")
                    added += 1
    return added


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip().splitlines()[2])
    *sources, destination = sys.argv[1:]
    print(f"{merge(sources, Path(destination))} samples added to {destination}")
