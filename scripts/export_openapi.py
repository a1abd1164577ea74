"""Write the API's OpenAPI schema to openapi/openapi.json (the committed contract).

    python scripts/export_openapi.py           # rewrite openapi/openapi.json
    python scripts/export_openapi.py --check   # exit 1 when the committed file is stale

The schema is built in-process from `create_app(Settings())`: nothing connects to Redis or storage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "openapi" / "openapi.json"


def render() -> str:
    """The schema as committed: sorted keys, two-space indent, a trailing newline."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from app.core.config import Settings
    from app.main import create_app

    return json.dumps(create_app(Settings()).openapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in args:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else None
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run python scripts/export_openapi.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
