"""`gally serve`: an OpenAI-compatible HTTP server (app.py) on the continuous-batching engine.
Needs the `serve` extra: pip install "gally[serve]"."""
