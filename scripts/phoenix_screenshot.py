"""A picture of one trace in Arize Phoenix, as docs/images/phoenix-trace.png shows one.

Opens a trace's detail view in headless Chromium and saves a PNG. Needs Playwright's Python
package and a Chromium (neither is a loupe dependency):

    pip install playwright            # in any environment
    apt-get install chromium          # or: playwright install chromium
    python scripts/phoenix_screenshot.py --trace-id <32 hex> [--phoenix http://localhost:6006]
                                         [--chromium /usr/bin/chromium] [--out phoenix-trace.png]

The trace id is the middle part of a response's `traceparent` header.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace-id", required=True)
    parser.add_argument("--phoenix", default="http://localhost:6006")
    parser.add_argument("--project-id", default="UHJvamVjdDox", help="Phoenix's id of the project (this one: "
                        "the first project, 'default')")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", default="phoenix-trace.png")
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to let the trace view render")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{args.phoenix}/projects/{args.project_id}/traces/{args.trace_id}", wait_until="networkidle")
        time.sleep(args.wait)  # the span tree renders a while after the page settles
        page.screenshot(path=args.out)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
