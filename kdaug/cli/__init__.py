"""Command-line interface: `kdaug <command>`; each command lives in its own module."""
