"""The plugin manager: built-in plugins, entry points, and what they registered."""

from __future__ import annotations

import importlib
import os
import threading

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "zephyr_plugins"

# Built-ins register through the same hooks a third party uses.
_BUILTIN_PLUGINS = (
    "zephyr_plugins.backends.reference",
    "zephyr_plugins.backends.cuda",
    "zephyr_plugins.backends.dense",
    "zephyr_plugins.templates",
)

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None


def get_plugin_manager(load_entry_points: bool | None = None) -> pluggy.PluginManager:
    """The process-wide plugin manager, created on first use.

    Entry points are loaded once; set ``ZEPHYR_PLUGINS_NO_ENTRYPOINTS=1`` (tests
    do) or pass ``load_entry_points=False`` on the first call to skip them.
    """
    global _manager
    with _lock:
        if _manager is None:
            pm = pluggy.PluginManager("zephyr_plugins")
            pm.add_hookspecs(hookspecs)
            for name in _BUILTIN_PLUGINS:
                pm.register(importlib.import_module(name), name=name)
            if load_entry_points is None:
                load_entry_points = os.environ.get("ZEPHYR_PLUGINS_NO_ENTRYPOINTS", "") not in ("1", "true")
            if load_entry_points:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            _manager = pm
        return _manager


def reset_plugin_manager() -> None:
    """Forget the manager (tests use this after registering plugins of their own)."""
    global _manager
    with _lock:
        _manager = None


def kernel_backends() -> list[type]:
    """Every registered kernel backend class, highest priority first."""
    found: list[type] = []
    get_plugin_manager().hook.register_kernels(register=found.append)
    unique = list(dict.fromkeys(found))
    return sorted(unique, key=lambda b: -b.priority)


def prompt_templates() -> dict:
    """Every registered prompt template, by name."""
    found: dict = {}

    def register(name, template):
        found[name] = template

    get_plugin_manager().hook.register_prompt_templates(register=register)
    return found
