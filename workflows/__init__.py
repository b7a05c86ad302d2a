"""How stages are scheduled: :mod:`workflows.local` (one scene on this machine).

:mod:`workflows.summary` reports a finished run on the console.
"""
