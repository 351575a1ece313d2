"""The numbers that bound what an anonymous caller can make a transceiver spend, with why.

Kept apart, with no imports, so the CLI shows them as defaults without loading
aiortc; admission.py, candidates.py, mux.py and the service apply them.
"""

# An answered session must connect within this.  Setup takes ~35 ms (BENCHMARKS.md section 5) and a
# browser's first check follows the answer at once, so 10 s is generous on a loaded host, while an
# offer that never connects holds a pending slot, a registration and its checks a third as long as
# the former 30 s.  aioice retransmits a check 5 times within 10 s (RTO 0.5 s, doubling).
CONNECT_TIMEOUT = 10.0

# A voice client opens one session per call, an office behind one NAT address a few a second at
# most; the capacity bench opens 48 at once from one client (bench/suite.py), which the burst lets
# through.  One source then holds at most 50 + 5/s x 10 s = 100 pending sessions, what MAX_PENDING
# allows in all: more sources share those 100.
OFFER_RATE = 5.0          # offers per second per source (IPv4 address, IPv6 /64)
OFFER_BURST = 50          # offers a quiet source may send at once
MAX_PENDING = 100         # sessions answered but not yet connected
OFFER_SOURCES = 4096      # sources whose token buckets are kept (~200 bytes each)

# A bound client address silent this long is unbound: RFC 7675 ends consent after 30 s without an
# authenticated answer (aioice: 6 checks 5 s apart), so by then its session has lost that path
# anyway.  A live call sends every 20 ms (Opus DTX: 400 ms) and checks consent every 5 s.
ADDRESS_TIMEOUT = 30.0

# Remote candidates checked per ICE generation (candidates.py says why 16).
MAX_REMOTE_CANDIDATES = 16
