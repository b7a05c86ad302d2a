"""Analysis of a run: ground-truth evaluation (``evaluate``, with ``metrics`` and ``alignment``), checks of a finished
run (``diagnose``), the HTML report (``report``).
"""
