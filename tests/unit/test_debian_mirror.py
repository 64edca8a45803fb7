"""The mirror `make kernel-vm` fetches Debian 11's kernel from is the one the host's apt sources name."""

from __future__ import annotations

import pytest

from tests.harness.debian_mirror import mirror_from

pytestmark = pytest.mark.unit

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_deb822_entry_for_the_hosts_suite():
    assert mirror_from([("debian.sources", DEB822)], "bookworm") == "http://deb.debian.org/debian"


def test_one_line_entry_with_options_and_a_trailing_slash():
    text = ("# comment\n"
            "deb-src http://src.example/debian bookworm main\n"
            "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian/ bookworm main\n")
    assert mirror_from([("sources.list", text)], "bookworm") == "http://mirror.example/debian"


def test_security_updates_third_party_and_disabled_entries_are_not_the_mirror():
    third_party = "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n"
    disabled = "Types: deb\nURIs: http://old.example/debian\nSuites: bookworm\nEnabled: no\n"
    one_line = ("deb http://security.example/debian-security bookworm-security main\n"
                "deb http://updates.example/debian bookworm-updates main\n")
    sources = [("sources.list", one_line), ("a.sources", third_party), ("b.sources", disabled)]
    assert mirror_from(sources, "bookworm") is None
    assert mirror_from(sources + [("debian.sources", DEB822)], "bookworm") == "http://deb.debian.org/debian"


def test_continuation_lines_in_a_stanza():
    text = "Types: deb\nURIs:\n http://deb.debian.org/debian\nSuites:\n bookworm\nComponents: main\n"
    assert mirror_from([("debian.sources", text)], "bookworm") == "http://deb.debian.org/debian"
