"""Reads trace-fanout.sh's system-call traces: per message, where the time went.

A message is found by the server's first read after 20 ms without a read or write (at
light load the core is idle between messages). Every write after it to another socket
is a delivery (eight-byte writes, a runtime waking its own thread through an eventfd,
are left out); the generator's reads after it are the subscribers' (and the publisher's
reply, one among a hundred; eight-byte reads, of an eventfd or of the publisher's
timerfd, are left out too). Times are medians over the messages, in µs from the server's
read of the publisher's frame.
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
        if m.group(3) in ("sys_enter_write", "sys_enter_read") and count and int(count.group(1), 16) == 8:
            continue  # an eventfd (a runtime waking one of its threads) or a timerfd, not a socket
        event = (float(m.group(2)), m.group(3), int(fd.group(1), 16) if fd else None)
        (server if m.group(1) == server_pid else bench).append(event)
    return server, bench


def messages(server, bench):
    quiet_since, starts = -1.0, []
    for i, (t, event, fd) in enumerate(server):
        if event in READS + WRITES:
            quiet = t - quiet_since > 0.02 and (not starts or t - starts[-1][0] > 0.02)
            if event in READS and quiet:
                starts.append((t, fd, i))
            quiet_since = t
    rows = []
    for t0, publisher, i in starts:
        writes = [
            t for t, e, fd in server[i : i + 5000] if e in WRITES and fd != publisher and t - t0 < 0.05
        ]
        reads = [t for t, e, _ in bench if t0 < t < t0 + 0.05 and e in READS]
        sent = [t for t, e, _ in bench if t0 - 0.005 < t <= t0 and e in WRITES]
        if len(writes) < 2 or len(reads) < len(writes) or not sent:
            continue
        mid, last = len(writes) // 2 - 1, len(writes) - 1
        rows.append(
            [(t0 - sent[-1]) * 1e6]
            + [(t - t0) * 1e6 for t in (writes[0], writes[mid], writes[last])]
            + [(t - t0) * 1e6 for t in (reads[0], reads[mid], reads[last])]
        )
    return rows


COLUMNS = (
    ("publish→read", 12),
    ("write 1st", 10),
    ("mid", 6),
    ("last", 6),
    ("gen read 1st", 13),
    ("mid", 6),
    ("last", 6),
)


def main():
    print(" " * 14, " ".join(f"{name:>{width}s}" for name, width in COLUMNS), " messages")
    for base in sys.argv[1:]:
        name = base.rsplit("/", 1)[-1]
        rows = messages(*load(base))
        if not rows:
            print(f"{name:14s} no message found")
            continue
        medians = [round(statistics.median(column)) for column in zip(*rows)]
        cells = " ".join(f"{m:>{width}d}" for m, (_, width) in zip(medians, COLUMNS))
        print(f"{name:14s} {cells}  {len(rows)}")


if __name__ == "__main__":
    main()
