"""`kubectl_complete-retransmit`: what kubectl 1.26+ offers after `kubectl retransmit`, read
from the plugin's own parser; trace names asked of the API server only where a name goes."""

from __future__ import annotations

import pytest

from retransmit_plugin.complete import DEFAULT, NO_FILES, NO_SPACE, completions, main
from retransmit_plugin.main import build_parser

pytestmark = pytest.mark.unit

TRACES = ["shop-loss", "shop-slow", "blue-443"]


class Names:
    """The API edge: the traces a cluster would list, and which connection was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple] = []

    def __call__(self, kubeconfig, context) -> list[str]:
        self.asked.append((kubeconfig, context))
        return sorted(TRACES)


def complete(*words: str) -> tuple[list[str], int, list[tuple]]:
    names = Names()
    found, directive = completions(build_parser(), words, names)
    return found, directive, names.asked


@pytest.mark.parametrize("words, want", [
    ([""], ["check", "delete", "run", "show", "watch"]),
    (["sh"], ["show"]),
    (["--context", "kind-x", "w"], ["watch"]),                   # a flag's value is not the subcommand
    (["-n", "shop", ""], ["check", "delete", "run", "show", "watch"]),
])
def test_subcommands(words, want):
    found, directive, asked = complete(*words)
    assert (found, directive, asked) == (want, NO_FILES, [])


def test_flags_of_the_subcommand_being_typed_with_the_global_ones():
    found, directive, _ = complete("run", "--n")
    assert found == ["--name", "--namespace", "--namespace-filter", "--node"] and directive == NO_FILES
    found, _, _ = complete("show", "x", "-")
    assert {"-w", "--watch", "-o", "--output", "--context", "--kubeconfig", "-n", "-A", "--operator-namespace"} <= set(found)
    assert "--keep" not in found
    found, _, _ = complete("--")
    assert "--version" in found and "--watch" not in found


@pytest.mark.parametrize("words, want, directive", [
    (["show", "x", "-o", ""], ["table", "wide", "json", "yaml", "name", "jsonpath="], NO_FILES),
    (["show", "x", "-o", "js"], ["json", "jsonpath="], NO_FILES),
    (["show", "x", "-o", "jsonp"], ["jsonpath="], NO_FILES | NO_SPACE),
    (["show", "x", "--output=y"], ["--output=yaml"], NO_FILES),
    (["run", "--family", ""], ["IPv4", "IPv6"], NO_FILES),
    (["run", "--kubeconfig", ""], [], DEFAULT),                  # a file: the shell's own completion
    (["run", "--port", ""], [], NO_FILES),
])
def test_flag_values(words, want, directive):
    assert complete(*words)[:2] == (want, directive)


@pytest.mark.parametrize("words, want", [
    (["show", "shop"], ["shop-loss", "shop-slow"]),
    (["watch", ""], ["blue-443", "shop-loss", "shop-slow"]),
    (["-o", "json", "show", "--context", "kind-x", "b"], None),  # -o is not global: the words still parse
    (["delete", "shop-loss", "shop"], ["shop-slow"]),           # delete takes several, each once
])
def test_trace_names_come_from_the_api_where_a_name_goes(words, want):
    found, directive, asked = complete(*words)
    if want is None:
        assert found == ["blue-443"] and asked == [(None, "kind-x")]
    else:
        assert found == want and asked == [(None, None)]
    assert directive == NO_FILES


def test_the_connection_flags_typed_so_far_choose_the_cluster():
    _, _, asked = complete("--kubeconfig", "/k", "show", "--context=kind-x", "")
    assert asked == [("/k", "kind-x")]


@pytest.mark.parametrize("words", [["show", "shop-loss", ""], ["run", ""], ["check", ""]])
def test_no_names_where_none_goes_and_no_api_call(words):
    assert complete(*words) == ([], NO_FILES, [])


def test_without_a_cluster_completion_prints_only_the_directive(capsys, tmp_path):
    assert main(["--kubeconfig", str(tmp_path / "absent"), "show", ""]) == 0
    out = capsys.readouterr()
    assert out.out == f":{NO_FILES}\n" and out.err == ""
