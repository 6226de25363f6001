"""Screenshot of the Space as a visitor first sees it (for the README): the app on 127.0.0.1, headless chromium.

    .venv/bin/python scripts/space_screenshot.py docs/space.png

Uses the example `nlsr demo` prepared on this machine (or $NLSR_SPACE_EXAMPLE); needs Debian's chromium.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(out: str) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.path.insert(0, str(ROOT / "spaces_app"))
    import app
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.build_demo()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                        headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#summary").get_by_text("modules patched").wait_for(timeout=300_000)
            page.locator("#measured [aria-roledescription=\"bar\"]").first.wait_for(timeout=60_000)
            page.wait_for_timeout(2_000)
            page.screenshot(path=out, full_page=False)
            browser.close()
    finally:
        demo.close()
    print(f"screenshot written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/space.png"))
