#!/usr/bin/env python3
"""Redis CPU per event of the ways a router can serve many destinations.

The measurements behind docs/decisions/0004-many-destinations.md. Each
pattern stores EVENTS events (about 300 bytes, like the gateway's entries)
in one shard stream and delivers them, through Redis commands only (no
HTTP), to D destinations, each taking the events of one type (every event
goes to exactly one destination), or to D destinations taking everything.
It reports redis-server's CPU time (user + system, from /proc) per event,
ingest and delivery together, and as a ratio to the same pattern with one
destination.

    python3 -m venv /tmp/v && /tmp/v/bin/pip install redis
    /tmp/v/bin/python bench/redis-patterns.py [redis-server binary]

Patterns:
  groups   today: every destination's group reads every entry and acks it.
  claim    one plain read per shard; a destination claims each entry it
           wants into its group (XGROUP SETID to the entry before it, then
           XREADGROUP COUNT 1); other groups' positions move once per batch.
  route    a routing group reads each entry once and adds a reference (the
           same id, no payload) to the stream of each destination that
           wants it; each destination's group reads its references and the
           payloads behind them in one script.
  accept   as `route`, but the references are added by the write that
           stores the event (the gateway routes).
"""

import os
import subprocess
import sys
import tempfile
import time

import redis

EVENTS = 16_000
BATCH = 100
USERS = 1_000
PAD = "x" * 200

READ_REFS = """
local refs = redis.call('XREADGROUP', 'GROUP', ARGV[1], 'c', 'COUNT', ARGV[2], 'STREAMS', KEYS[2], '>')
if not refs then return {} end
local out = {}
for _, ref in ipairs(refs[1][2]) do
  local entry = redis.call('XRANGE', KEYS[1], ref[1], ref[1])
  if entry[1] then out[#out + 1] = entry[1] end
end
return out
"""

CLAIM = """
-- ARGV: group, then (previous id, id) pairs
local out = {}
for i = 2, #ARGV, 2 do
  redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], ARGV[i])
  local got = redis.call('XREADGROUP', 'GROUP', ARGV[1], 'c', 'COUNT', 1, 'STREAMS', KEYS[1], '>')
  if got then out[#out + 1] = got[1][2][1] end
end
return out
"""


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def event_type(user, types):
    return f"t{user % types}"


def events(types):
    for n in range(EVENTS):
        user = n % USERS
        yield user, {
            "user": f"user-{user}",
            "payload": f'{{"seq":{n // USERS},"pad":"{PAD}"}}',
            "received_at": "1765000000000",
            "event_type": event_type(user, types),
        }


def ingest(r, types, refs_to):
    """Stores the events; with refs_to, also a reference per destination
    that wants it, in the same transaction (pattern `accept`)."""
    batch = r.pipeline(transaction=refs_to is not None)
    for i, (user, fields) in enumerate(events(types)):
        event_id = f"{i + 1}-0"
        batch.xadd("{s}:events", fields, id=event_id)
        if refs_to is not None:
            for dest in refs_to(user):
                batch.xadd(f"{{s}}:d:{dest}", {"e": ""}, id=event_id)
        if i % BATCH == BATCH - 1:
            batch.execute()
    batch.execute()


def wanted_by(dests, types):
    if types == 1:
        return lambda user: range(dests)
    return lambda user: [user % types]


def pattern_groups(r, dests, types):
    ingest(r, types, None)
    for d in range(dests):
        r.xgroup_create("{s}:events", f"g{d}", id="0")
    for d in range(dests):
        while True:
            got = r.xreadgroup(f"g{d}", "c", {"{s}:events": ">"}, count=BATCH)
            if not got or not got[0][1]:
                break
            r.xack("{s}:events", f"g{d}", *[entry_id for entry_id, _ in got[0][1]])


def pattern_claim(r, dests, types):
    ingest(r, types, None)
    for d in range(dests):
        r.xgroup_create("{s}:events", f"g{d}", id="0")
    claim = r.register_script(CLAIM)
    wants = wanted_by(dests, types)
    last = "0-0"
    while True:
        got = r.xread({"{s}:events": last}, count=BATCH)
        if not got or not got[0][1]:
            break
        entries = got[0][1]
        per_dest = {}
        prev = last
        for entry_id, fields in entries:
            user = int(fields[b"user"].split(b"-")[1])
            for d in wants(user):
                per_dest.setdefault(d, []).extend([prev, entry_id])
            prev = entry_id
        batch_end = entries[-1][0]
        pipe = r.pipeline(transaction=False)
        for d in range(dests):
            if d in per_dest:
                claim(keys=["{s}:events"], args=[f"g{d}"] + per_dest[d], client=pipe)
        claimed = pipe.execute()
        pipe = r.pipeline(transaction=False)
        for d, got_d in zip([d for d in range(dests) if d in per_dest], claimed):
            pipe.xack("{s}:events", f"g{d}", *[e[0] for e in got_d])
        for d in range(dests):
            pipe.execute_command("XGROUP", "SETID", "{s}:events", f"g{d}", batch_end)
        pipe.execute()
        last = batch_end


def deliver_refs(r, dests):
    read = r.register_script(READ_REFS)
    for d in range(dests):
        key = f"{{s}}:d:{d}"
        while True:
            got = read(keys=["{s}:events", key], args=[f"g{d}", BATCH])
            if not got:
                break
            r.xack(key, f"g{d}", *[entry[0] for entry in got])


def create_ref_groups(r, dests):
    for d in range(dests):
        r.xgroup_create(f"{{s}}:d:{d}", f"g{d}", id="0", mkstream=True)


def pattern_route(r, dests, types):
    ingest(r, types, None)
    create_ref_groups(r, dests)
    r.xgroup_create("{s}:events", "route", id="0")
    wants = wanted_by(dests, types)
    while True:
        got = r.xreadgroup("route", "c", {"{s}:events": ">"}, count=BATCH)
        if not got or not got[0][1]:
            break
        pipe = r.pipeline(transaction=False)
        for entry_id, fields in got[0][1]:
            user = int(fields[b"user"].split(b"-")[1])
            for d in wants(user):
                pipe.xadd(f"{{s}}:d:{d}", {"e": ""}, id=entry_id)
        pipe.xack("{s}:events", "route", *[entry_id for entry_id, _ in got[0][1]])
        pipe.execute()
    deliver_refs(r, dests)


def pattern_accept(r, dests, types):
    create_ref_groups(r, dests)
    ingest(r, types, wanted_by(dests, types))
    deliver_refs(r, dests)


PATTERNS = {
    "groups": pattern_groups,
    "claim": pattern_claim,
    "route": pattern_route,
    "accept": pattern_accept,
}
# (destinations, event types): each event to one destination, or to all.
LAYOUTS = [(1, 1, "1"), (16, 16, "16 filtered"), (64, 64, "64 filtered"), (16, 1, "16 fanned out")]


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "redis-server"
    rounds = int(os.environ.get("ROUNDS", "2"))
    with tempfile.TemporaryDirectory() as tmp:
        port = 7399
        server = subprocess.Popen(
            [binary, "--port", str(port), "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            r = redis.Redis(port=port)
            for _ in range(100):
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            pid = r.info("server")["process_id"]
            results = {}
            for _ in range(rounds):
                for name, run in PATTERNS.items():
                    for dests, types, label in LAYOUTS:
                        r.flushall()
                        before = cpu_seconds(pid)
                        run(r, dests, types)
                        per_event = (cpu_seconds(pid) - before) * 1e6 / EVENTS
                        results.setdefault((name, label), []).append(per_event)
            print("| pattern | destinations | Redis CPU µs/event (rounds) | ÷ 1 destination |")
            print("|---|---|---|---|")
            for name in PATTERNS:
                one = min(results[(name, "1")])
                for _, _, label in LAYOUTS:
                    figures = results[(name, label)]
                    shown = ", ".join(f"{f:.1f}" for f in figures)
                    print(f"| {name} | {label} | {shown} | {min(figures) / one:.2f} |")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
