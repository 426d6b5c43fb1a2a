"""Evaluation: bits per byte (loss.py), the CORE benchmark (core.py) and chat evaluations with ChatCORE (chatcore.py)."""
