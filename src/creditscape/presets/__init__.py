"""The embedded experiments, one TOML file each (``creditscape run --preset NAME``)."""

from pathlib import Path

DIRECTORY = Path(__file__).parent


def names() -> list[str]:
    return sorted(p.stem for p in DIRECTORY.glob("*.toml"))
