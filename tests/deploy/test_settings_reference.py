"""The settings table in docs/operations.md lists exactly the variables the processes read.

Settings (services.kernel.settings) is the one declaration of every variable; the docs table is
generated from it (``render_table``), so a variable added, renamed or removed in the code and
not in the docs fails here, with the table to paste in the failure message.
"""

from __future__ import annotations

from services.kernel import topology
from services.kernel.settings import (
    LIBRARY_VARIABLES,
    ProcessSettings,
    RelaySettings,
    Settings,
    SimulatorSettings,
    Variable,
    peer_variables,
)
from tests.deploy.chart import REPO_ROOT

OPERATIONS = REPO_ROOT / "docs" / "operations.md"
HEADING = "## Settings reference"


def every_variable() -> list[Variable]:
    """Every variable any process reads, once each, in the order the table shows them."""
    found: dict[str, Variable] = {}
    peers = tuple(dict.fromkeys(p for s in topology.SERVICES for p in s.calls))
    common = {v.name for v in ProcessSettings.variables()}
    groups = (
        # A service's own settings first, then its peers', then what every process reads.
        tuple(v for v in Settings.variables() if v.name not in common),
        peer_variables(peers),
        ProcessSettings.variables(),
        SimulatorSettings.variables(),
        RelaySettings.variables(),
        LIBRARY_VARIABLES,
    )
    for group in groups:
        for v in group:
            found.setdefault(v.name, v)
    return list(found.values())


def readers(name: str) -> str:
    """Which processes read ``name``, when not every service does."""
    who = []
    if name in {v.name for v in Settings.variables()}:
        return ""
    for s in topology.SERVICES:
        if name in {v.name for v in Settings.variables_of(s.name)}:
            who.append(s.name)
    if name in {v.name for v in SimulatorSettings.variables()}:
        who.append("the identity simulator")
    if name in {v.name for v in RelaySettings.variables()}:
        who.append("the relay")
    return ", ".join(who)


def render_table() -> str:
    """The docs' settings table, generated from the settings declarations."""
    lines = ["| variable | meaning |", "|---|---|"]
    for v in every_variable():
        meaning = v.meaning
        if v.name in {lv.name for lv in LIBRARY_VARIABLES}:
            pass  # read by a library, which its meaning names
        elif who := readers(v.name):
            meaning = f"{who} only: {meaning}"
        if v.required and "(required)" not in meaning:
            meaning += " (required)"
        lines.append(f"| `{v.name}` | {meaning} |")
    return "\n".join(lines) + "\n"


def documented_table() -> str:
    section = OPERATIONS.read_text().split(HEADING, 1)[1]
    rows = [line for line in section.split("\n## ", 1)[0].splitlines() if line.startswith("|")]
    return "\n".join(rows) + "\n"


def test_the_settings_table_is_generated_from_settings() -> None:
    expected = render_table()
    assert documented_table() == expected, (
        f"docs/operations.md's settings table is stale; replace it with:\n{expected}"
    )


def test_every_variable_in_the_table_is_read_and_every_read_one_is_in_it() -> None:
    """The same check by name alone, so a failure says which variable drifted."""
    documented = {
        line.split("`")[1] for line in documented_table().splitlines() if line.startswith("| `")
    }
    assert documented == {v.name for v in every_variable()}
