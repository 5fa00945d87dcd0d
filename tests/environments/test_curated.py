"""Cairn's curated environments."""

from __future__ import annotations

import re

from cairn.environments.client_overlay import client_distributions
from cairn.environments.curated import SKLEARN_PINS


def test_curated_pins_agree_with_cairns_client() -> None:
    """A curated environment never pins a package of Cairn's client at another version (its build
    would warn that Run.get_context() may fail in it)."""
    client = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in client_distributions()}
    assert "python-dateutil" in client  # through botocore: what pandas needs too
    for pin in SKLEARN_PINS:
        name, _, version = pin.partition("==")
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in client:
            assert client[key] == version, f"{pin}: Cairn's client uses {client[key]}"
