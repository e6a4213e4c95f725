#!/usr/bin/env python3
"""Start (and stop) a berth instance from Python, following its events.

    python3 docs/examples/publish.py <instance-id> --vram-gib 20 --gpus 1 [--timeout S] [--keep]

Needs nats-py and msgpack (`pip install nats-py msgpack`; ops/setup.sh puts them in
.berth/py, so `PYTHONPATH=.berth/py` works in a checkout). Connects to $BERTH_NATS_URL
(default nats://127.0.0.1:4222) as the publisher whose nkey seed is in $BERTH_NATS_CREDS
(`berth up` makes .berth/auth/publisher.nk; nats-py then needs the `nkeys` package too).
See docs/protocol.md for the messages.

Exit status: 0 when the instance reached `running` (and, without --keep, `stopped`);
1 otherwise, with the reason on stderr.
"""

import argparse
import asyncio
import os
import re
import sys
import time

import msgpack
import nats
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout
from nats.js.errors import APIError, NoStreamResponseError

GIB = 1 << 30
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# Where each command settles (docs/protocol.md, "Instance states").
START_SETTLED = {"running", "pending", "error"}
STOP_SETTLED = {"stopped", "error"}


class Failed(Exception):
    """Ends the run with exit status 1 and this message."""


async def wait_for(sub, cmd_seq, settled, timeout):
    """Prints events of the command `cmd_seq` until one is in `settled`; returns it.

    Events of older commands (cmd_seq lower than ours) are skipped; an event of a newer
    command means someone superseded ours.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failed(f"no {'/'.join(sorted(settled))} event within {timeout:g} s")
        try:
            msg = await sub.next_msg(timeout=left)
        except NatsTimeout:
            continue  # the deadline check above ends the loop
        try:
            event = msgpack.unpackb(msg.data, raw=False)
        except Exception as e:  # msgpack raises several kinds; none should end the wait
            print(f"  (skipping undecodable event: {e})", file=sys.stderr)
            continue
        if not isinstance(event, dict):
            continue
        seq = event.get("cmd_seq", 0)
        if seq < cmd_seq:
            continue
        state = event.get("state")
        line = f"  event: {state} (version {event.get('version')}, cmd_seq {seq})"
        if event.get("worker_id"):
            line += f" on {event['worker_id']}"
        if event.get("gpus"):  # only the `scheduled` event lists the GPU indexes
            line += f" GPUs {event['gpus']}"
        if event.get("reason"):
            line += f": {event['reason']}"
        print(line, flush=True)
        if seq > cmd_seq:
            raise Failed(f"superseded by a newer command (sequence {seq}); now {state}")
        if state in settled:
            return event


async def publish(js, subject, command):
    """Publishes `command` to JetStream; returns the stream sequence (the command's order)."""
    try:
        # stream= adds Nats-Expected-Stream, so the server refuses to store it elsewhere.
        ack = await js.publish(subject, msgpack.packb(command), timeout=5, stream="BERTH_CMD")
    except (NoStreamResponseError, NoRespondersError):
        raise Failed(f"no JetStream stream takes {subject}: has berth created BERTH_CMD?")
    except (APIError, NatsTimeout) as e:
        raise Failed(f"publish to {subject} failed: {e!r}")
    return ack.seq


async def run(args):
    url = os.environ.get("BERTH_NATS_URL", "nats://127.0.0.1:4222")
    creds = os.environ.get("BERTH_NATS_CREDS")
    errors = []

    async def remember(e):
        errors.append(e)

    try:
        nc = await asyncio.wait_for(
            nats.connect(url, connect_timeout=5, error_cb=remember,
                         **({"nkeys_seed": creds} if creds else {})),
            timeout=args.timeout
        )
    except (OSError, asyncio.TimeoutError, nats.errors.Error) as e:
        raise Failed(f"cannot connect to NATS at {url}: {errors[-1] if errors else e!r}")
    try:
        js = nc.jetstream()
        # Subscribe first, so no event published right after the command is missed.
        sub = await nc.subscribe(f"berth.events.instance.{args.instance_id}")
        await nc.flush()
        subject = f"berth.cmd.instance.{args.instance_id}"

        start = {
            "op": "start",
            "vram_bytes": int(args.vram_gib * GIB),
            "gpus": args.gpus,
            "model": args.model,
            "selector": {},
        }
        seq = await publish(js, subject, start)
        print(f"start published: {subject} sequence {seq}", flush=True)
        event = await wait_for(sub, seq, START_SETTLED, args.timeout)
        if event["state"] != "running":
            raise Failed(f"{args.instance_id} is {event['state']}: {event.get('reason', '')}")
        print(f"{args.instance_id} is running", flush=True)
        if args.keep:
            return

        seq = await publish(js, subject, {"op": "stop", "reason": "publish.py example"})
        print(f"stop published: {subject} sequence {seq}", flush=True)
        event = await wait_for(sub, seq, STOP_SETTLED, args.timeout)
        if event["state"] != "stopped":
            raise Failed(f"{args.instance_id} is {event['state']}: {event.get('reason', '')}")
        print(f"{args.instance_id} is stopped", flush=True)
    finally:
        await nc.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("instance_id", help="ASCII letters, digits, '-' and '_', at most 128")
    p.add_argument("--vram-gib", type=float, required=True, help="VRAM per GPU, in GiB")
    p.add_argument("--gpus", type=int, default=1, help="GPUs, all on one worker (default 1)")
    p.add_argument("--model", default="", help="model name (informational)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for each command to settle (default 30)")
    p.add_argument("--keep", action="store_true", help="leave the instance running")
    args = p.parse_args()
    if not ID_RE.match(args.instance_id):
        print(f"error: instance id {args.instance_id!r}: use only ASCII letters, digits, '-' and '_'"
              " (1 to 128 of them)", file=sys.stderr)
        return 1
    try:
        asyncio.run(run(args))
    except Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
