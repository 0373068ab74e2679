"""The demo: the user's blog, run twice (plain and with dropsafe) through the same faults.

Needs ``pip install 'dropsafe[demo]'`` (Flask, waitress, rich, matplotlib).
"""
