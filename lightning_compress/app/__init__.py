"""The application: ``cli`` (argument parsing and dispatch only), ``run`` (training a recipe, exporting
a checkpoint: library code shared by the command line, sweeps and the demo), ``sweep`` and ``demo``.

May import: every layer below (``config``, ``callbacks``, ``deploy``, ``core``, ``vision``,
``integrations``, ``errors``) and ``app`` itself. Nothing imports this package but the entry points.
"""
