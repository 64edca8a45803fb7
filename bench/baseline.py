"""The per-event baseline: every retransmit streamed to Python, the way bcc's tcpretrans does it.

    python -m bench.baseline            # runs until SIGTERM, then prints {"events": N, "lost": M}

Like tcpretrans: a perf buffer with a wake-up per event (perf_submit), a Python callback
per event that decodes it and formats a line (written to stdout; the bench sends it to
/dev/null). What the agent is compared against: the design's answer to "why not just
run tcpretrans on every node".
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time

SOURCE = r"""
struct event {
    u64 ts_ns;
    u32 pid;
    u16 family;
    u16 sport;
    u16 dport;
    u8 state;
    u8 saddr[16];
    u8 daddr[16];
};
BPF_PERF_OUTPUT(events);

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    struct event e = {};
    e.ts_ns = bpf_ktime_get_ns();
    e.pid = bpf_get_current_pid_tgid() >> 32;
    e.family = args->family;
    e.sport = args->sport;
    e.dport = args->dport;
    e.state = args->state;
    if (e.family == 2) {
        __builtin_memcpy(e.saddr, args->saddr, 4);
        __builtin_memcpy(e.daddr, args->daddr, 4);
    } else {
        __builtin_memcpy(e.saddr, args->saddr_v6, 16);
        __builtin_memcpy(e.daddr, args->daddr_v6, 16);
    }
    events.perf_submit(args, &e, sizeof(e));
    return 0;
}
"""

STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
          7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}


def main() -> int:
    from bcc import BPF

    bpf = BPF(text=SOURCE)
    table = bpf[b"events"]
    counts = {"events": 0, "lost": 0}
    out = sys.stdout

    def on_event(_cpu: int, data, _size: int) -> None:
        e = table.event(data)
        if e.family == 2:
            fam, n = socket.AF_INET, 4
        else:
            fam, n = socket.AF_INET6, 16
        src = socket.inet_ntop(fam, bytes(e.saddr[:n]))
        dst = socket.inet_ntop(fam, bytes(e.daddr[:n]))
        out.write(f"{time.strftime('%H:%M:%S')} {e.pid:<7d} {4 if n == 4 else 6} "
                  f"{src}:{e.sport:<5d} R> {dst}:{e.dport:<5d} {STATES.get(e.state, e.state)}\n")
        counts["events"] += 1

    def on_lost(lost: int) -> None:
        counts["lost"] += lost

    # tcpretrans's defaults: perf buffer, a wake-up per event (wakeup_events=1).
    table.open_perf_buffer(on_event, page_cnt=64, lost_cb=on_lost)
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    print("attached", file=sys.stderr, flush=True)
    while running[0]:
        bpf.perf_buffer_poll(timeout=200)
    out.flush()
    print(json.dumps(counts), file=sys.stderr, flush=True)
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
