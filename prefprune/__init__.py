"""prefprune: find the preference pairs that make a reward model worse."""

__version__ = "0.1.0"
