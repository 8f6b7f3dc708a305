"""The ``dcss`` command (:mod:`~dcss_plugin.app.cli`), the run report (:mod:`~dcss_plugin.app.report`) and its
pictures (:mod:`~dcss_plugin.app.plots`). Importing this package imports none of them (nor matplotlib)."""
