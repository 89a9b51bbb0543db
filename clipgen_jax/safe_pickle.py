"""A restricted unpickler for the two pickle-based weight formats the project must read (taming `.ckpt` files and the
LPIPS weight pickles). It resolves only the globals a caller admits by name, so a pickle that tries to call anything
else (os.system, eval, ...) is refused before any of its code runs. Plain `pickle.load` is never used on such files.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO, Callable, Mapping

# Containers and scalars that any weight pickle may use.
BASIC_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "bool"): bool,
    ("builtins", "str"): str,
    ("builtins", "bytes"): bytes,
    ("builtins", "slice"): slice,
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the admitted set."""


class _RestrictedUnpickler(pickle.Unpickler):

    def __init__(self, file: BinaryIO, allowed: Mapping[tuple[str, str], Any],
                 persistent_load: Callable[[Any], Any] | None, source: str):
        super().__init__(file)
        self._allowed = allowed
        self._persistent_load = persistent_load
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source} refers to {module}.{name}, which a weights file has no reason to contain; refusing "
                f"to load it (only arrays and plain containers are admitted)") from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise UnsafePickleError(f"{self._source} uses persistent ids, which this format does not admit")
        return self._persistent_load(pid)


def restricted_load(data: bytes | BinaryIO, allowed: Mapping[tuple[str, str], Any], *, source: str = "pickle",
         persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Unpickles `data`, resolving only the globals in `allowed` ((module, name) -> object)."""
    file = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    return _RestrictedUnpickler(file, {**BASIC_GLOBALS, **allowed}, persistent_load, source).load()
