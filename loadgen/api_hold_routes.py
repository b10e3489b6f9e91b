#!/usr/bin/env python3
"""Announce N routes in VNI 23 to a MetalBond server and hold them (keepalives) until killed."""
import socket, struct, sys, threading, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7f; v >>= 7
        if v: out.append(b | 0x80)
        else: out.append(b); return bytes(out)
def field_varint(f, v): return varint(f << 3) + varint(v) if v else b""
def field_bytes(f, b): return varint((f << 3) | 2) + varint(len(b)) + b
def frame(t, payload): return struct.pack(">BHB", 1, len(payload), t) + payload
hop = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
def update(i):
    dest = field_bytes(2, struct.pack(">I", 0x0a000000 + i)) + field_varint(3, 32)
    nh = field_bytes(1, hop)
    return frame(5, field_varint(2, 23) + field_bytes(3, dest) + field_bytes(4, nh))
s = socket.create_connection((host, port))
s.sendall(frame(1, field_varint(1, 60)))
time.sleep(0.2); s.recv(65536)
s.sendall(frame(2, b"")); time.sleep(0.2); s.recv(65536)
lock = threading.Lock()
def ka():
    while True:
        time.sleep(10)
        with lock: s.sendall(frame(2, b""))
threading.Thread(target=ka, daemon=True).start()
def drain():
    while s.recv(65536): pass
threading.Thread(target=drain, daemon=True).start()
buf = bytearray()
for i in range(n):
    buf += update(i)
    if len(buf) > 1 << 20:
        with lock: s.sendall(buf)
        buf = bytearray()
with lock: s.sendall(buf)
print("announced", n, flush=True)
while True: time.sleep(1)
