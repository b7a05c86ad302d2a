"""Analysis of a run: ground-truth evaluation (``evaluate``), checks of a finished run (``diagnose``), the HTML report (``report``).
"""
