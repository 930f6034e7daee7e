"""Writes docs/config.md from the key declarations (jaxgpt.config.keys_markdown); tests/test_front_door.py
fails when it is out of date.

    python scripts/write_config_doc.py
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from conftest import entry_points  # noqa: E402
from jaxgpt.config import keys_markdown  # noqa: E402

if __name__ == "__main__":
    with open(os.path.join(ROOT, "docs", "config.md"), "w", encoding="utf-8") as f:
        f.write(keys_markdown(entry_points()) + "\n")
    print("wrote docs/config.md")
