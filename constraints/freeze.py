"""Prints, as pip constraints, the installed version of every package that clipgen_jax[test,parity] and the parity
tests' no-deps packages need, transitively: `make constraints` writes constraints/cpu.txt with it."""

import importlib.metadata
import re
import sys

from packaging.requirements import Requirement

ROOTS = ("clipgen_jax[test,parity]", "taming-transformers-rom1504", "lpips")
NO_DEPS = {"taming-transformers-rom1504", "lpips"}  # installed with --no-deps (see the Makefile)
HEADER = """\
# Versions verified together: `make install-test` installs with these pins and `make test` passes on them, on
# Python 3.11, CPU, x86-64 Linux (they also resolve on 3.12; jax >= 0.8 needs Python >= 3.11). torch is the CPU
# build (torch==2.13.0; where pip's default torch is a CUDA one, point pip at a CPU wheel of it).
# Refresh: `make constraints` (the newest versions within setup.py's ranges, written here), then `make test`.
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure() -> dict[str, str]:
    """{distribution name: version} of ROOTS' requirements in this environment, followed transitively."""
    environment = {"python_version": f"{sys.version_info.major}.{sys.version_info.minor}"}
    pending = [Requirement(root) for root in ROOTS]
    found, seen = {}, set()
    while pending:
        requirement = pending.pop()
        name, extras = _canonical(requirement.name), frozenset(requirement.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        distribution = importlib.metadata.distribution(requirement.name)
        found[name] = (distribution.metadata["Name"], distribution.version)
        if name in NO_DEPS:
            continue
        for text in distribution.requires or ():
            dependency = Requirement(text)
            marker = dependency.marker
            if marker is None or any(marker.evaluate({**environment, "extra": extra}) for extra in extras | {""}):
                pending.append(dependency)
    return {display: version for display, version in found.values()}


def main() -> None:
    pins = closure()
    pins.pop("clipgen_jax", None)
    lines = [f"{name}=={version.split('+')[0]}" for name, version in sorted(pins.items(), key=lambda i: i[0].lower())]
    sys.stdout.write(HEADER + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
