"""How stages are scheduled: :mod:`workflows.local` (one scene on this machine)."""
