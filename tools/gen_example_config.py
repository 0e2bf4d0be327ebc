"""Write sendtime.example.toml from the settings types, or check it is current.

python tools/gen_example_config.py           # rewrite sendtime.example.toml
python tools/gen_example_config.py --check   # exit 1 if it differs from the settings
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sendtime.server.example_config import render

EXAMPLE = Path(__file__).resolve().parent.parent / "sendtime.example.toml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not EXAMPLE.exists() or EXAMPLE.read_text() != text:
            print(f"{EXAMPLE.name} is not what the settings say: run python tools/gen_example_config.py")
            return 1
        return 0
    EXAMPLE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
