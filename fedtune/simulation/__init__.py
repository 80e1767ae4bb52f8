"""The simulation harness: many virtual clients sharing one base model (see engine.py)."""
