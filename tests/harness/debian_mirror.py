"""The Debian mirror this host's apt already uses, read from its sources (one-line and deb822).

    /usr/bin/python3 tests/harness/debian_mirror.py      prints e.g. http://deb.debian.org/debian

kernelvm_setup.sh fetches Debian 11's kernel from the same mirror with a throwaway apt
configuration (`deb <mirror> bullseye main`), so no mirror host is written in the tree.
The mirror is the URI of the first enabled `deb` entry for the host's own release suite
(VERSION_CODENAME in /etc/os-release, e.g. `bookworm`; not `bookworm-updates`, not a
security archive, not a third-party repository with a suite of its own). Run as a script (not `-m`): from the checkout's root, the top-level
operator/ folder would shadow the standard library.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional

SOURCES = Path("/etc/apt/sources.list")
SOURCE_PARTS = Path("/etc/apt/sources.list.d")
OS_RELEASE = Path("/etc/os-release")


def _one_line_entries(text: str) -> Iterator[tuple[list[str], list[str], list[str]]]:
    """(types, uris, suites) of each `deb [options] uri suite components...` line."""
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        kind, rest = words[0], words[1:]
        if rest and rest[0].startswith("["):
            # options: `[a=b c=d]`, possibly spread over several words
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2:
            yield [kind], [rest[0]], [rest[1]]


def _deb822_entries(text: str) -> Iterator[tuple[list[str], list[str], list[str]]]:
    """(types, uris, suites) of each enabled stanza of a .sources file."""
    stanza: dict[str, str] = {}
    key = ""
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza and stanza.get("enabled", "yes").lower() != "no":
                yield stanza.get("types", "").split(), stanza.get("uris", "").split(), stanza.get("suites", "").split()
            stanza, key = {}, ""
        elif line[0] in " \t" and key:
            stanza[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            stanza[key] = value.strip()
    return


def mirror_from(sources: Iterable[tuple[str, str]], codename: str) -> Optional[str]:
    """The URI serving suite `codename` in `sources`, pairs of (file name, text); None when none does."""
    for name, text in sources:
        entries = _deb822_entries(text) if name.endswith(".sources") else _one_line_entries(text)
        for types, uris, suites in entries:
            if "deb" not in types:
                continue
            for uri in uris:
                if "security" in uri:
                    continue
                if codename in suites:
                    return uri.rstrip("/")
    return None


def host_sources() -> list[tuple[str, str]]:
    """This host's apt source files in the order apt reads them (only names apt reads)."""
    files = [SOURCES] if SOURCES.is_file() else []
    if SOURCE_PARTS.is_dir():
        files += sorted(p for p in SOURCE_PARTS.iterdir() if p.suffix in (".list", ".sources"))
    return [(p.name, p.read_text(errors="replace")) for p in files]


def host_codename() -> str:
    """VERSION_CODENAME from /etc/os-release ("" when absent)."""
    for line in OS_RELEASE.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME":
            return value.strip().strip('"')
    return ""


def main() -> int:
    codename = host_codename()
    mirror = mirror_from(host_sources(), codename) if codename else None
    if mirror is None:
        print(f"debian_mirror: no `deb` entry for this host's suite ({codename or 'no VERSION_CODENAME in ' + str(OS_RELEASE)}) "
              f"in {SOURCES} or {SOURCE_PARTS}/*.list|*.sources: add the host's Debian mirror to apt's sources",
              file=sys.stderr)
        return 1
    print(mirror)
    return 0


if __name__ == "__main__":
    sys.exit(main())
