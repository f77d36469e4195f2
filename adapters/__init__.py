"""Framework adapters, importable as ``zephyr_plugins.adapters.<name>``.

Each adapter imports its framework lazily and, if it is missing, raises an
``ImportError`` that names the extra to install.
"""


def require(module: str, extra: str):
    """Import ``module`` or raise an ImportError naming ``pip install "zephyr-plugins[extra]"``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this adapter needs {module!r}, which is not installed: pip install \"zephyr-plugins[{extra}]\""
        ) from exc
