#!/usr/bin/env python3
"""K concurrent full walks of /api/v1/routes?vni=23 (limit 10000): seconds per walk, routes seen.
Cheap on the client side: counts next hops and finds `next` without parsing the JSON."""
import sys, threading, time, re, urllib.request, urllib.parse
http, k = sys.argv[1], int(sys.argv[2])
res = []
NEXT = re.compile(rb'"next":\s*"([^"]+)"\s*}\s*$')
def walk():
    t0 = time.time(); after = None; seen = 0; pages = 0
    while True:
        q = "vni=23&limit=10000" + ("&after=" + urllib.parse.quote(after, safe="") if after else "")
        with urllib.request.urlopen(f"http://{http}/api/v1/routes?{q}", timeout=300) as r:
            body = r.read()
        pages += 1
        seen += body.count(b'"address"')
        m = NEXT.search(body)
        if not m: break
        after = m.group(1).decode()
    res.append((time.time() - t0, seen, pages))
ts = [threading.Thread(target=walk) for _ in range(k)]
t0 = time.time()
for t in ts: t.start()
for t in ts: t.join()
res.sort()
print(f"{k} walks in {time.time()-t0:.2f} s; per walk {res[0][0]:.2f}-{res[-1][0]:.2f} s (median {res[len(res)//2][0]:.2f}); routes seen {set(r[1] for r in res)}; pages {set(r[2] for r in res)}")
