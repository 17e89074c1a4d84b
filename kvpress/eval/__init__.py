"""Evaluation: offline long-context tasks, the lm-eval model type and its launcher."""
