"""Make docs/screenshot.png: the web chat page after a short conversation.

    .venv/bin/python docs/screenshot.py

Starts ``navi-trio serve`` (memory store, scripted agent) on a free port, drives Debian's
Chromium with Playwright (as the browser tests do), and saves the page.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

OUT = Path(__file__).with_name("screenshot.png")
ANSWER = """Here is what **navi-trio** streams to this page:

- *thinking*, shown apart and collapsible
- tool calls as cards, with their arguments and result
- the answer as Markdown, with `code` and [links](https://example.org)

```python
async with trio.open_nursery() as nursery:
    nursery.start_soon(run.play)
```
"""


def main() -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "navi_trio", "serve", "--port", "0", "--store", "memory", "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        for line in server.stdout:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m[1]
                break
        else:
            raise SystemExit("the server did not start")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.goto(url)
            box = page.locator("form#composer textarea[name=content]")
            box.fill("Hello! What can you show me?")
            box.press("Enter")
            expect(page.locator("[data-role=assistant]").last).to_have_attribute("data-status", "complete")
            steps = [
                {"think": "A tour, then: thinking, a tool call and some Markdown."},
                {"tool": "calculator", "args": {"expression": "6*7"}, "result": "42"},
                {"text": ANSWER},
            ]
            box.fill(json.dumps({"script": steps}))
            box.press("Enter")
            expect(page.locator("[data-role=assistant]").last).to_have_attribute("data-status", "complete")
            page.locator("details.tool").last.evaluate("d => d.open = true")
            page.locator("details.thinking").last.evaluate("d => d.open = true")
            page.locator("#messages").evaluate("m => m.scrollTop = m.scrollHeight")
            page.screenshot(path=str(OUT))
            browser.close()
    finally:
        server.terminate()
        server.wait(10)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
