"""What the command-line tools share: bad flags and config overrides end the program with one line on stderr,
`error: <what is wrong>; <what to do>`, and exit status 1, before anything is loaded or written."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

from absl import flags


def fail(message: str) -> NoReturn:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(1)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """An absl `app.run(main, flags_parser=parse_flags)` parser: flag errors in one line instead of absl's two, and
    a `--config.<path>=<value>` override that names no field of the config (which ml_collections reports with a
    traceback) as one line naming the override."""
    try:
        return flags.FLAGS(list(argv))
    except flags.Error as error:
        fail(f"{str(error).rstrip('.')}; --helpshort lists the flags")
    except (AttributeError, KeyError) as error:  # raised by ml_collections' config override flags only
        while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(message))
            error = error.args[0]
        field, *suggestion = str(error.args[0] if error.args else error).splitlines()
        field = field.strip("'\" ")
        overrides = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")]
        named = [arg for arg in overrides if field in arg[len("--config."):].split(".")] or overrides or ["--config"]
        fail(f"{named[0]}: the config has no field {field!r}{' (' + ' '.join(suggestion) + ')' if suggestion else ''}; "
             "check the name against the config file")
