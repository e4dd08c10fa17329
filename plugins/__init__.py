"""hf-lowmem's first-party plugins, one module per plugin family, each registering its
:class:`hf_lowmem.Plugin` objects from ``hf_lowmem_register``.

Each module is named by an entry point in the ``hf_lowmem`` group of hf-lowmem's own
``pyproject.toml``; the core never imports these modules directly. Module top levels import nothing
heavy: optional packages are imported in the plugins' methods, when a plugin is selected and used.
"""
