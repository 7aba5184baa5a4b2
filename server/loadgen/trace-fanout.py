"""Reads trace-fanout.sh's system-call traces: per message, where the time went.

A message is found by the server's first read after 20 ms without a read or write (at
light load the core is idle between messages). Every write after it to another socket
is a delivery (eight-byte writes, a runtime waking its own thread through an eventfd,
are left out); the generator's reads after it are the subscribers'. Times are medians
over the messages, in µs from the server's read of the publisher's frame.
"""

import re
import statistics
import sys

READS = ("sys_enter_read", "sys_enter_recvfrom")
WRITES = ("sys_enter_writev", "sys_enter_write", "sys_enter_sendto")
LINE = re.compile(r"\s*(\d+)\s+([\d.]+):\s+syscalls:(\S+):\s*(.*)")
FD = re.compile(r"fd: (0x[0-9a-f]+)")
COUNT = re.compile(r"count: (0x[0-9a-f]+)")


def load(base):
    server_pid, bench_pid = open(base + ".pids").read().split()
    server, bench = [], []
    for line in open(base + ".txt"):
        m = LINE.match(line)
        if not m:
            continue
        fd, count = FD.search(m.group(4)), COUNT.search(m.group(4))
        if m.group(3) == "sys_enter_write" and count and int(count.group(1), 16) == 8:
            continue  # an eventfd: a runtime waking one of its threads, not a socket
        event = (float(m.group(2)), m.group(3), int(fd.group(1), 16) if fd else None)
        (server if m.group(1) == server_pid else bench).append(event)
    return server, bench


def messages(server, bench):
    quiet_since, starts = -1.0, []
    for i, (t, event, fd) in enumerate(server):
        if event in READS + WRITES:
            if event in READS and t - quiet_since > 0.02 and (not starts or t - starts[-1][0] > 0.02):
                starts.append((t, fd, i))
            quiet_since = t
    rows = []
    for t0, publisher, i in starts:
        writes = [t for t, e, fd in server[i : i + 5000] if e in WRITES and fd != publisher and t - t0 < 0.05]
        reads = [t for t, e, _ in bench if t0 < t < t0 + 0.05 and e in READS]
        sent = [t for t, e, _ in bench if t0 - 0.005 < t <= t0 and e in WRITES]
        if len(writes) < 2 or len(reads) < len(writes) or not sent:
            continue
        mid, last = len(writes) // 2 - 1, len(writes) - 1
        us = lambda t: (t - t0) * 1e6
        rows.append(
            ((t0 - sent[-1]) * 1e6, us(writes[0]), us(writes[mid]), us(writes[last]),
             us(reads[0]), us(reads[mid]), us(reads[last]))
        )
    return rows


def main():
    print(f"{'':14s} {'publish→read':>12s} {'write 1st':>10s} {'mid':>6s} {'last':>6s} {'gen read 1st':>13s} {'mid':>6s} {'last':>6s}  messages")
    for base in sys.argv[1:]:
        rows = messages(*load(base))
        if not rows:
            print(f"{base.rsplit('/', 1)[-1]:14s} no message found")
            continue
        medians = [round(statistics.median(column)) for column in zip(*rows)]
        print(f"{base.rsplit('/', 1)[-1]:14s} " + " ".join(f"{m:>{w}d}" for m, w in zip(medians, (12, 10, 6, 6, 13, 6, 6))) + f"  {len(rows)}")


main()
