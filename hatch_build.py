"""Map the repository's fixed folders into the one import package, ``fedlinear``, in the wheel.

The repository keeps ``common/``, ``clients/``, ``server/`` and ``scripts/`` at its top level (Flower
builds the app bundle from repository-relative paths and never remaps them); the wheel installs them
as ``fedlinear/common`` and so on, plus the app's ``pyproject.toml`` (``fedlinear run`` stages the
Flower app from it). hatchling's ``sources`` option would do the same for the standard wheel but makes
an editable install impossible (hatchling refuses a rewrite that adds a prefix), so the mapping is
added here for the standard wheel only (the rooms' redirects in ``fedlinear/<room>/`` stay out of it:
``only-include`` takes just ``fedlinear/__init__.py``). The editable wheel maps just ``fedlinear`` to
the repository's ``fedlinear/`` folder (``dev-mode-exact``), whose redirects find the folders: tests,
benchmarks and the bare folder names stay off ``sys.path``.
"""

from __future__ import annotations

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ROOMS = ("common", "clients", "server", "scripts")


class RoomsHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel" or version != "standard":
            return
        build_data["force_include"].update({room: f"fedlinear/{room}" for room in ROOMS})
        build_data["force_include"]["pyproject.toml"] = "fedlinear/pyproject.toml"
