"""What every command-line tool of this project does with bad input."""

import sys
from typing import Callable


def exit_on_bad_input(command: Callable[[], None]) -> None:
    """Run a command-line tool: bad input ends in one line on stderr and exit status 1."""
    try:
        command()
    except (ValueError, FileNotFoundError) as e:  # LimitError, ConfigError, ModelError, ...
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


def read_text(path: str) -> str:
    """A UTF-8 text file the user named, or a ValueError that says what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: convert it (iconv -t UTF-8)")
