"""Diagnose a drop-off by intervention: replay arms from the checkpoint before it.

``arms`` says what each arm changes, ``verdict`` how their outcomes become a cause.
"""
