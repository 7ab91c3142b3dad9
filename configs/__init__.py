"""Mesh presets (JSON), installed as dfjax.configs so that `--mesh NAME` finds them in an installed wheel too."""
