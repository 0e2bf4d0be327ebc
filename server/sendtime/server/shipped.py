"""Files that ship with sendtime: the default templates, the demo catalog and its pictures.

A wheel carries them inside the package (``sendtime/server/shipped_files/``, see
pyproject's force-include); an editable install runs from the source checkout,
where they are ``templates/`` and ``demo/`` at its top. Either way the server
finds them from its own location, not from the folder it was started in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

_PACKAGED: Final = Path(__file__).resolve().parent / "shipped_files"
#: server/sendtime/server/shipped.py -> the checkout's top folder
_CHECKOUT: Final = Path(__file__).resolve().parents[3]

TEMPLATES: Final = "templates"
DEMO_CATALOG: Final = "demo/catalog.json"
#: The demo catalog's pictures, served at /demo/images/<name>.
DEMO_IMAGES: Final = "demo/images"


def shipped(relative: str) -> Path:
    """Where the shipped file or folder ``relative`` is (it may not exist, in a
    broken install: the caller says so)."""
    packaged = _PACKAGED / relative
    return packaged if packaged.exists() else _CHECKOUT / relative
