"""Measuring: benchmarks and result tables over the other layers (here: many languages on one trunk).
It may import every layer but the CLI; only the CLI (and tests) import it."""
