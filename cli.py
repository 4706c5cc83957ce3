"""Command-line conventions shared by the package's scripts.

Import this module before torch, diffusers and transformers: it silences the notices those
libraries print at import and load time that ask nothing of the user (transformers' missing
torchvision, diffusers' `torch_dtype` deprecation, per-file weight-loading bars), unless the
command line says `--verbose`. A user's mistake ends the script with one line on stderr that
names the flag, and exit code 2 (argparse's convention); tracebacks stay for bugs. Numeric flags
take their range from the `type`s below (`positive_int`, ...), and `user_errors` turns a library's
check of a flag's value into such a line.

    python cli.py --help
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

VERBOSE_FLAG = "--verbose"
# Read by transformers and diffusers when they are first imported.
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
# warnings.warn messages (regular expressions) with nothing for the user to act on.
QUIET_WARNINGS = (
    r".*`torch_dtype` is deprecated",
    r".*torchvision",
    r".*`local_dir_use_symlinks` argument is deprecated",  # huggingface_hub, under diffusers' load_config
)


quiet = VERBOSE_FLAG not in sys.argv[1:]


def silence_third_party() -> None:
    """Hide the third-party notices listed above, unless --verbose; call again once the libraries
    are imported, to reach the settings that only their logging modules hold (loading bars)."""
    if not quiet:
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()  # per-file "Loading weights" bars
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()


def usage_error(message: str) -> NoReturn:
    """End the script on a user's mistake: one line on stderr (name the flag and the fix), exit 2."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


@contextmanager
def user_errors(flag: str, *errors: type[Exception]) -> Iterator[None]:
    """Within the block, `errors` (a library's checks of what `flag` gave) are the user's mistake:
    their message, prefixed by the flag, ends the script as `usage_error` does."""
    try:
        yield
    except errors as error:
        usage_error(f"{flag}: {error}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default shown, and the description (a module's docstring, with its example commands)
    kept as written. A flag whose default is None or "" says in its own help what its absence means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default == "":
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with every default shown in --help, a --verbose flag, and one-line errors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(
            VERBOSE_FLAG, action="store_true", help="show the libraries' own notices and loading bars"
        )

    def error(self, message: str) -> NoReturn:
        usage_error(message)

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        global quiet
        parsed = super().parse_args(args, namespace)
        quiet = not parsed.verbose
        silence_third_party()
        return parsed


def number(
    kind: type[int] | type[float], low: float, high: float = math.inf, above: bool = False
) -> Callable[[str], float]:
    """An argparse `type`: a finite `kind` number from `low` (exclusive with `above`) to `high`; a
    value outside ends the script with a line that names the flag and the range."""
    noun = "a whole number" if kind is int else "a number"
    if high < math.inf:
        wanted = f"{noun} from {low} to {high}"
    else:
        wanted = f"{noun} {'above' if above else 'of at least'} {low}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (low < value if above else low <= value) and value <= high):
            raise argparse.ArgumentTypeError(f"give {wanted}, not {text!r}")
        return value

    return parse


positive_int = number(int, 1)
non_negative_int = number(int, 0)
positive_float = number(float, 0, above=True)
non_negative_float = number(float, 0)
fraction = number(float, 0, 1)

silence_third_party()


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    print("Every script of the package: `python SCRIPT.py --help`.")


if __name__ == "__main__":
    main()
