"""Verifies captured webhook deliveries with the reference Standard Webhooks
library (PyPI `standardwebhooks`), independent of the router's signer.

Usage: verify_signatures.py CAPTURED_JSON SECRET...

CAPTURED_JSON holds the mock destinations' `/captured` list. For each
secret, prints how many deliveries verify, and how many are rejected once
their body is tampered with (a byte appended) or their id is changed.
"""

import json
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def verifies(webhook, body, headers):
    try:
        webhook.verify(body, headers)
        return True
    except WebhookVerificationError:
        return False


def main():
    with open(sys.argv[1]) as f:
        captured = json.load(f)
    report = []
    for secret in sys.argv[2:]:
        webhook = Webhook(secret)
        verified = tampered_rejected = 0
        for request in captured:
            headers = request["headers"]
            body = request["body"]
            if verifies(webhook, body, headers):
                verified += 1
            other_id = dict(headers, **{"webhook-id": headers["webhook-id"] + "x"})
            if not verifies(webhook, body + " ", headers) and not verifies(
                webhook, body, other_id
            ):
                tampered_rejected += 1
        report.append(
            {
                "requests": len(captured),
                "verified": verified,
                "tampered_rejected": tampered_rejected,
            }
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
