"""`kubectl_complete-retransmit`: shell completion for `kubectl retransmit` (kubectl 1.26+).

kubectl runs this executable with the words typed after `kubectl retransmit`, the last one
the word being completed (empty after a space), and reads one candidate per line, then
`:DIRECTIVE` (cobra's completion protocol: 4 no file names, 2 no space after the word, 0 the
shell's default). Subcommands and flags come from the plugin's own parser, so they cannot
drift from it; trace names for show, watch and delete from the API server, and nothing at
all when it cannot be reached (a completion never prints an error).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Optional, Sequence

from retransmit_core.naming import DEFAULT_NAMESPACE

from .main import Cluster, build_parser
from .tables import JSONPATH, OUTPUTS

# cobra's ShellCompDirective bits.
DEFAULT, NO_SPACE, NO_FILES = 0, 2, 4
# The longest a completion waits for the API server: connect, then read (seconds).
API_TIMEOUT = (1.0, 2.0)
# Subcommands whose next word is a trace name (delete takes several).
NAMED = {"show": 1, "watch": 1, "delete": None}

TraceNames = Callable[[Optional[str], Optional[str]], list[str]]


def takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # type: ignore[return-value]


def no_space(candidates: list[str]) -> int:
    """NO_SPACE when the one way on is to type more after '=' (jsonpath=...)."""
    return NO_SPACE if candidates and all(c.endswith("=") for c in candidates) else 0


def values_of(action: argparse.Action) -> tuple[list[str], int]:
    """What may follow a flag that takes a value."""
    if action.dest == "output":
        return [*OUTPUTS, f"{JSONPATH}="], NO_FILES
    if action.dest == "kubeconfig":
        return [], DEFAULT                       # a file name: the shell completes it
    return [str(c) for c in action.choices or []], NO_FILES


def completions(parser: argparse.ArgumentParser, words: Sequence[str], trace_names: TraceNames) -> tuple[list[str], int]:
    """The candidates for the last word of `words` and cobra's directive (pure but for
    `trace_names(kubeconfig, context)`, called only where a trace name may come)."""
    *typed, current = list(words) or [""]
    commands = subcommands(parser)
    active, command, positionals = parser, None, 0
    expecting: Optional[argparse.Action] = None
    given: dict[str, Any] = {}
    for word in typed:
        if expecting is not None:
            given[expecting.dest], expecting = word, None
            continue
        if word.startswith("-") and word != "-":
            flag, eq, value = word.partition("=")
            action = active._option_string_actions.get(flag)
            if action is not None and takes_value(action):
                if eq:
                    given[action.dest] = value
                else:
                    expecting = action
            continue
        if command is None and word in commands:
            command, active = word, commands[word]
        elif command is not None:
            positionals += 1
    if expecting is not None:
        found, directive = values_of(expecting)
        out = [v for v in found if v.startswith(current)]
        return out, directive | no_space(out)
    if current.startswith("-"):
        flag, eq, value = current.partition("=")
        action = active._option_string_actions.get(flag)
        if eq and action is not None and takes_value(action):
            found, directive = values_of(action)
            out = [f"{flag}={v}" for v in found if v.startswith(value)]
        else:
            out = sorted({s for a in active._actions for s in a.option_strings if s.startswith(current)})
            directive = NO_FILES
        return out, directive | no_space(out)
    if command is None:
        return sorted(c for c in commands if c.startswith(current)), NO_FILES
    if command in NAMED and (NAMED[command] is None or positionals < NAMED[command]):
        names = trace_names(given.get("kubeconfig"), given.get("context"))
        return [n for n in names if n.startswith(current) and n not in typed], NO_FILES
    return [], NO_FILES


def trace_names(kubeconfig: Optional[str], context: Optional[str]) -> list[str]:
    """Every trace's name, or none when the cluster cannot be asked (no config, no answer,
    not allowed): completion stays silent."""
    logging.getLogger("urllib3").setLevel(logging.CRITICAL)      # no retry warnings on the terminal
    try:
        return Cluster(kubeconfig, context, DEFAULT_NAMESPACE).names(timeout=API_TIMEOUT)
    except Exception:  # noqa: BLE001 - whatever went wrong, there is nothing to offer
        return []


def main(argv: Optional[Sequence[str]] = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    found, directive = completions(build_parser(), words, trace_names)
    print("\n".join([*found, f":{directive}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
