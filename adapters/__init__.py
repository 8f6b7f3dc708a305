"""Adapters that plug DCSS into other libraries (imported as ``dcss_plugin.adapters``).

Each submodule imports its library only when it is itself imported, so ``import dcss_plugin`` stays light.
"""
