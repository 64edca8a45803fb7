"""One TCP connection driven line by line, whose sender reports its own TCP_INFO counters:
the reference for a flow's segment counters. Run inside a test namespace:

    python -m tests.harness.segsender --server-ip A --client-ip B --port P

It connects B -> A:P (a thread on A reads and discards everything), prints
{"client": [ip, port]}, then answers one JSON line per command read from stdin:
  bulk N   send N bytes while sampling TCP_INFO; once all are acknowledged, the counters
           at the end and the samples ({"t": CLOCK_MONOTONIC ns taken after each read, ...})
  send N   queue N bytes and return at once: the counters right after
  info     the counters now
  quit     close and exit

The counters are struct tcp_info's tcpi_data_segs_out and tcpi_total_retrans (the
connection's tcp_sock data_segs_out and total_retrans, what `ss -ti` prints as
data_segs_out and retrans:X/TOTAL) and tcpi_unacked.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time

# Offsets in struct tcp_info (include/uapi/linux/tcp.h): 8 bytes of u8 fields, then u32s
# from tcpi_rto; tcpi_total_retrans is the 24th u32, tcpi_data_segs_out follows the four
# u64 rates and byte counts and five more u32s (both since Linux 4.6).
TCP_INFO_SIZE = 160
UNACKED_OFFSET = 24
TOTAL_RETRANS_OFFSET = 100
DATA_SEGS_OUT_OFFSET = 156
SAMPLE_EVERY_SECONDS = 0.002
CHUNK = 64 * 1024


def counters(sock: socket.socket) -> dict[str, int]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    if len(raw) < TCP_INFO_SIZE:
        raise SystemExit(f"TCP_INFO is {len(raw)} bytes: this kernel has no tcpi_data_segs_out")
    return {"unacked": struct.unpack_from("<I", raw, UNACKED_OFFSET)[0],
            "total_retrans": struct.unpack_from("<I", raw, TOTAL_RETRANS_OFFSET)[0],
            "data_segs_out": struct.unpack_from("<I", raw, DATA_SEGS_OUT_OFFSET)[0]}


def drain(conn: socket.socket) -> None:
    with conn:
        while conn.recv(CHUNK):
            pass


def bulk(sock: socket.socket, nbytes: int) -> dict:
    """Send nbytes, sampling the counters meanwhile; return once the peer acknowledged all."""
    samples: list[dict] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            info = counters(sock)
            samples.append({"t": time.monotonic_ns(), **info})
            done.wait(SAMPLE_EVERY_SECONDS)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        payload, left = b"x" * CHUNK, nbytes
        while left > 0:   # chunk by chunk: the sampler gets the interpreter between sends
            left -= sock.send(payload[:min(CHUNK, left)])
        while counters(sock)["unacked"]:
            time.sleep(SAMPLE_EVERY_SECONDS)
    finally:
        done.set()
        sampler.join()
    return {**counters(sock), "samples": samples}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-ip", required=True)
    parser.add_argument("--client-ip", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    family = socket.AF_INET6 if ":" in args.server_ip else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((args.server_ip, args.port))
    server.listen(1)
    client = socket.socket(family, socket.SOCK_STREAM)
    client.bind((args.client_ip, 0))
    client.connect((args.server_ip, args.port))
    conn, _ = server.accept()
    reader = threading.Thread(target=drain, args=(conn,), daemon=True)
    reader.start()

    def say(doc: dict) -> None:
        print(json.dumps(doc), flush=True)

    say({"client": list(client.getsockname()[:2])})
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "bulk":
            say(bulk(client, int(rest[0])))
        elif command == "send":
            client.send(b"y" * int(rest[0]))
            say(counters(client))
        elif command == "info":
            say(counters(client))
        elif command == "quit":
            break
        else:
            say({"error": f"unknown command {command!r}"})
    client.close()


if __name__ == "__main__":
    main()
