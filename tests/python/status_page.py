"""Drives the router's status page in headless Chromium.

0. Checks the page refuses a browser without the admin token (401), then
   signs in the way a person would: HTTP Basic, the token as the password.
1. Loads the page and checks every number it shows against the admin API
   answer for the same measurement (the page's data-sequence).
2. Saves a screenshot.
3. Clicks the replay button of one destination and checks the page reports
   the replay.

Prints {"replayed": N} on success; exits non-zero naming the mismatch
otherwise. Run by tests/tests/browser.rs, which starts the system.
"""

import argparse
import json
import sys
import urllib.request

from playwright.sync_api import Error, sync_playwright

NUMBER_FIELDS = [
    "lag",
    "pending",
    "in_flight",
    "users_in_backoff",
    "parked_users",
    "parked_events",
    "dead_letters",
    "delivered",
    "retried",
]


def fetch_overview(admin_url, token):
    request = urllib.request.Request(
        admin_url + "/admin/destinations", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def expected_text(destination, field):
    value = destination[field]
    return "?" if value is None else str(value)


def check_page_matches_api(page, admin_url, token):
    """Returns the overview the page was checked against."""
    for _ in range(100):
        page.goto(admin_url + "/")
        sequence = int(page.get_attribute("body", "data-sequence"))
        overview = fetch_overview(admin_url, token)
        if overview["sequence"] == sequence:
            break
    else:
        sys.exit("the page and the API never showed the same measurement")

    mismatches = []
    for destination in overview["destinations"]:
        row = page.locator(f'tr[data-destination="{destination["name"]}"]')
        if row.count() != 1:
            sys.exit(f'no row for destination {destination["name"]}')

        def shown(field):
            return row.locator(f'[data-field="{field}"]').inner_text().strip()

        for field in NUMBER_FIELDS:
            if shown(field) != expected_text(destination, field):
                mismatches.append((destination["name"], field, shown(field), destination[field]))
        rate = f'{destination["delivery_rate"]:.1f}'
        if shown("delivery_rate") != rate:
            mismatches.append((destination["name"], "delivery_rate", shown("delivery_rate"), rate))
        state = shown("state")
        if (state == "paused") != destination["paused"]:
            mismatches.append((destination["name"], "state", state, destination["paused"]))
    if mismatches:
        sys.exit(f"page differs from the admin API (sequence {sequence}): {mismatches}")
    return overview


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--admin-url", required=True)
    parser.add_argument("--admin-token", required=True)
    parser.add_argument("--replay", required=True, help="destination whose replay button to click")
    parser.add_argument("--screenshot", required=True)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=args.chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
            ],
        )
        stranger = browser.new_page()
        try:
            status = stranger.goto(args.admin_url + "/").status
        except Error as error:
            # Chromium ends a 401 Basic challenge it has no credentials for
            # with this error instead of showing the page.
            if "ERR_INVALID_AUTH_CREDENTIALS" not in str(error):
                raise
            status = 401
        if status != 401:
            sys.exit(f"the status page answered {status} without the admin token, not 401")
        stranger.close()

        context = browser.new_context(
            viewport={"width": 1500, "height": 420},
            http_credentials={"username": "admin", "password": args.admin_token},
        )
        page = context.new_page()
        overview = check_page_matches_api(page, args.admin_url, args.admin_token)
        page.screenshot(path=args.screenshot, full_page=True)

        target = next(d for d in overview["destinations"] if d["name"] == args.replay)
        waiting = target["dead_letters"]
        if waiting == 0:
            sys.exit(f"{args.replay} has no dead letters to replay")
        button = page.locator(f'tr[data-destination="{args.replay}"] [data-action="replay"]')
        with page.expect_navigation():
            button.click()
        notice = page.locator('[data-field="notice"]').inner_text().strip()
        expected = f"Replaying {waiting} dead letters to {args.replay}."
        if notice != expected:
            sys.exit(f"after clicking replay the page says {notice!r}, expected {expected!r}")
        browser.close()
    print(json.dumps({"replayed": waiting}))


if __name__ == "__main__":
    main()
