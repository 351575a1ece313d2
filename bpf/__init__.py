"""XDP data plane sources, shipped as package data so an installed splitrelay can compile them."""
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
