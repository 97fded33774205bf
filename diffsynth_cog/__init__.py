"""diffsynth-cog: long-video extension toolkit for CogVideoX."""

__version__ = "0.1.0"
