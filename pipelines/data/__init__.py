"""Demo data from files that ship in installed packages, and offline model weights."""
