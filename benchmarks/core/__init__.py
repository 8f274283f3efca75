"""Shared layer of relearn-bench: data, models, log-probs, training loop, metrics, results.

Nothing in here imports ``defenses`` or ``attacks``; they import from here.
"""
