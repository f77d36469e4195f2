"""Plugin hooks (pluggy). A plugin is any module or object with ``@hookimpl`` functions.

Third-party plugins register through the ``zephyr_plugins`` entry-point group::

    [project.entry-points.zephyr_plugins]
    my_backend = "my_package.zephyr_backend"

Example plugin::

    from zephyr_plugins import hookimpl

    @hookimpl
    def register_kernels(register):
        register(MyBackend)          # a KernelBackend subclass

    @hookimpl
    def register_prompt_templates(register):
        register("chatml", my_template)   # a PromptTemplate
"""

import pluggy

hookspec = pluggy.HookspecMarker("zephyr_plugins")
hookimpl = pluggy.HookimplMarker("zephyr_plugins")


@hookspec
def register_kernels(register):
    """Call ``register(backend_class)`` for each :class:`~zephyr_plugins.backends.KernelBackend`."""


@hookspec
def register_prompt_templates(register):
    """Call ``register(name, template)`` for each :class:`~zephyr_plugins.templates.PromptTemplate`."""
