"""hf-lowmem's first-party plugins, one module per plugin family.

Each module is named by an entry point in the ``hf_lowmem`` group of hf-lowmem's own
``pyproject.toml``; the core never imports these modules directly. Module top levels import nothing
heavy: optional packages are imported in ``hf_lowmem_validate`` or when the plugin is used.
"""
