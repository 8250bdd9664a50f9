#!/usr/bin/env python3
"""What a restart through SO_REUSEPORT loses, against socket hand-over, on loopback.

Two "processes" (threads here, the kernel's behaviour is the same) serve one port while
clients open a new connection for every request. At half time the old one stops
accepting and closes its listening socket, as an old proxy does when the new one is up:
  reuseport  each has its own socket bound with SO_REUSEPORT; the kernel spreads new
             connections over both queues, and those waiting in the old one's queue
             when it closes are reset
  handover   the new one serves the old one's socket (a duplicate descriptor, as
             SCM_RIGHTS gives it), so there is one queue and closing the old
             descriptor loses nothing
Prints the failed connections of each. Bounded (a few seconds), loopback only.

    python3 benches/reuseport-gap.py [--seconds 3] [--clients 8]
"""
import argparse
import socket
import threading
import time


def listener(port=0, reuseport=True):
    s = socket.socket()
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)
    return s


def serve(sock, stop, slow=0.0):
    """Answers each connection with `ok` until `stop`; `slow` seconds per accept
    stands for a process busy elsewhere, so that its queue is not empty."""
    sock.settimeout(0.01)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except (socket.timeout, OSError):
            continue
        try:
            conn.sendall(b"ok")
        finally:
            conn.close()
        if slow:
            time.sleep(slow)


def clients(port, until, n):
    ok, failed = [0], [0]
    lock = threading.Lock()

    def run():
        while time.time() < until:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                    good = c.recv(2) == b"ok"
            except OSError:
                good = False
            with lock:
                if good:
                    ok[0] += 1
                else:
                    failed[0] += 1

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ok[0], failed[0]


def trial(mode, seconds, n):
    old = listener(reuseport=True)
    port = old.getsockname()[1]
    new = listener(port) if mode == "reuseport" else old.dup()
    stop_old, stop_new = threading.Event(), threading.Event()
    threads = [threading.Thread(target=serve, args=(old, stop_old, 0.001)),
               threading.Thread(target=serve, args=(new, stop_new))]
    for t in threads:
        t.start()
    until = time.time() + seconds
    result = {}
    load = threading.Thread(target=lambda: result.update(r=clients(port, until, n)))
    load.start()
    time.sleep(seconds / 2)
    stop_old.set()
    threads[0].join()
    old.close()  # the old process exits
    load.join()
    stop_new.set()
    threads[1].join()
    new.close()
    return result["r"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--clients", type=int, default=8)
    a = ap.parse_args()
    for mode in ["reuseport", "handover"]:
        ok, failed = trial(mode, a.seconds, a.clients)
        print(f"{mode:9}  {ok:6} connections answered  {failed:4} failed")


if __name__ == "__main__":
    main()
