"""Offline, deterministic RULER-style long-context tasks over real English prose.

Entry point: ``kvpress.eval.tasks.generator`` (``make_tasks``, ``score``, ``TASKS`` and a CLI).
"""
