"""Where every benchmark's measurement goes: one JSON line appended to a results file, also printed."""

import json
import pathlib


def append(path: str, result: dict) -> None:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))
