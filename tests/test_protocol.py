"""The wire protocol: frames, MACs, sequence numbers, keys; and a live agent fed bad frames."""

import hashlib
import logging
import os
import queue
import subprocess
import sys
import threading
import time

import msgpack
import psutil
import pytest

from lepton_magic import protocol
from lepton_magic.backends.base import NodeLink


def _frames(key, messages, first_seq=1):
    """Each message's frames as bytes, numbered on from ``first_seq`` as one sender numbers them."""
    signer = protocol.FrameSigner(key, first_seq=first_seq)
    return [b"".join(bytes(p) for parts in signer.frames(m) for p in parts) for m in messages]


def _parse(key, data):
    splitter = protocol.FrameSplitter(key, "test peer")
    splitter.feed(data)
    return list(splitter.messages()), splitter


# --- frames ------------------------------------------------------------------------------------
def test_roundtrip_small_and_large_frames():
    secret = protocol.new_secret()
    r, w = os.pipe()
    writer = protocol.FrameWriter(w, secret)
    big = os.urandom(3 << 20)

    def produce():
        writer.send({"t": "a", "blob": big})
        for i in range(1000):
            writer.send({"t": "n", "i": i})
        os.close(w)

    threading.Thread(target=produce).start()
    messages = list(protocol.FrameReader(r, secret))
    os.close(r)
    assert messages[0]["blob"] == big
    assert [m["i"] for m in messages[1:]] == list(range(1000))


def test_buffers_travel_out_of_band_in_bounded_frames():
    secret = protocol.new_secret()
    big = bytearray(os.urandom(3 * protocol.MAX_FRAME_BODY + 12345))  # four frames, hashed in chunks
    frames = list(protocol.FrameSigner(secret).frames({"t": "r", "_buffers": [big, b"abc"]}, final=True))
    headers = [protocol._HEADER.unpack(bytes(parts[0])) for parts in frames]
    assert all(h[6] <= protocol.MAX_FRAME_BODY for h in headers)
    more, cont = protocol.MORE, protocol.CONT
    assert [h[2] for h in headers] == [more, cont | more, cont | more, cont | protocol.FINAL]
    r, w = os.pipe()
    writer = protocol.FrameWriter(w, secret)
    threading.Thread(target=lambda: (writer.send({"t": "r", "_buffers": [big, b"abc"]}), os.close(w))).start()
    message = protocol.FrameReader(r, secret).read()
    os.close(r)
    assert [bytes(b) for b in message["_buffers"]] == [bytes(big), b"abc"]
    assert not message["_buffers"][0].readonly  # arrays loaded from it stay writable
    assert "_lens" not in message


def test_a_message_that_lost_a_frame_is_dropped_and_the_next_one_arrives(caplog):
    secret = protocol.new_secret()
    signer = protocol.FrameSigner(secret)
    split = [b"".join(bytes(p) for p in parts)
             for parts in signer.frames({"t": "big", "pad": b"x" * (2 * protocol.MAX_FRAME_BODY)})]
    after = _frames(secret, [{"t": "after"}], first_seq=signer.next_seq)[0]
    with caplog.at_level(logging.WARNING, logger="lepton_magic.protocol"):
        out, splitter = _parse(secret, split[0] + split[2] + after)
    assert [m["t"] for m in out] == ["after"]
    assert "whose previous frame was lost" in caplog.text


def test_frames_split_at_any_byte_boundary():
    secret = protocol.new_secret()
    stream = b"".join(_frames(secret, [{"i": i, "pad": "x" * i} for i in range(50)]))
    splitter = protocol.FrameSplitter(secret)
    got = []
    for i in range(0, len(stream), 7):
        splitter.feed(stream[i:i + 7])
        got.extend(m["i"] for m in splitter.messages())
    assert got == list(range(50))


def test_version_and_magic_are_checked_at_the_start_of_a_stream():
    secret = protocol.new_secret()
    frame = bytearray(_frames(secret, [{"t": "x"}])[0])
    frame[2] = protocol.VERSION + 1
    with pytest.raises(protocol.ProtocolError, match="version"):
        protocol.FrameSplitter(secret, "old agent").feed(bytes(frame))
    with pytest.raises(protocol.ProtocolError, match="bad magic"):
        protocol.FrameSplitter(secret).feed(b"GET / HTTP/1.1\r\n" * 8)


def test_garbage_after_the_start_is_skipped_to_the_next_frame(caplog):
    secret = protocol.new_secret()
    first, second = _frames(secret, [{"t": "first"}, {"t": "second"}])
    with caplog.at_level(logging.WARNING, logger="lepton_magic.protocol"):
        out, splitter = _parse(secret, first + b"GET / HTTP/1.1\r\nLM\x02" * 100 + second)
    assert [m["t"] for m in out] == ["first", "second"]
    assert splitter.rejected == 1 and caplog.text.count("dropped") == 1  # one line for the whole run


# --- authentication ----------------------------------------------------------------------------
def test_tampered_or_forged_frames_are_dropped_before_decoding(caplog, monkeypatch):
    decoded = []
    decode = protocol.decode_body
    monkeypatch.setattr(protocol, "decode_body", lambda body: decoded.append(bytes(body)) or decode(body))
    secret = protocol.new_secret()
    start, tampered, good = _frames(secret, [{"t": "start"}, {"t": "run", "n": 2}, {"t": "x", "n": 1}])
    tampered = bytearray(tampered)
    tampered[-1] ^= 0x01  # one bit of the body
    forged = _frames(protocol.new_secret(), [{"t": "run", "n": 3}], first_seq=10)[0]  # wrong key
    with caplog.at_level(logging.WARNING, logger="lepton_magic.protocol"):
        out, splitter = _parse(secret, start + bytes(tampered) + forged + good)
    assert [m["t"] for m in out] == ["start", "x"]
    assert splitter.rejected == 2
    assert caplog.text.count("failed HMAC verification") == 2
    assert len(decoded) == 2  # only the genuine frames were ever decoded


def test_every_header_byte_is_authenticated():
    """Probe: the MAC covered the body only; a signed frame with its flags or meta length
    changed still verified (and the meta length made decoding raise)."""
    secret = protocol.new_secret()
    for offset in range(protocol.HEADER_SIZE):
        start, frame, good = _frames(secret, [{"t": "start"}, {"t": "x", "pad": b"p" * 40}, {"t": "good"}])
        tampered = bytearray(frame)
        tampered[offset] ^= 0x01
        out, _splitter = _parse(secret, start + bytes(tampered) + good)
        assert [m["t"] for m in out] == ["start", "good"], f"header byte {offset} is not authenticated"


def test_a_signed_body_that_does_not_decode_is_dropped(caplog):
    secret = protocol.new_secret()
    meta = msgpack.packb({"t": "ping"})
    bad_bodies = [(len(meta) - 1).to_bytes(8, "big") + meta,  # the meta length one short
                  (len(meta) + 5).to_bytes(8, "big") + meta,  # longer than the body
                  b"\x00" * 3, msgpack.packb([1, 2]),
                  len(meta).to_bytes(8, "big") + msgpack.packb({"t": "x", "_lens": [99]})]
    signer = protocol.FrameSigner(secret)
    frames = [bytes(signer._header(0, [memoryview(b)])) + b for b in bad_bodies]
    good = _frames(secret, [{"t": "good"}], first_seq=signer.next_seq)[0]
    with caplog.at_level(logging.WARNING, logger="lepton_magic.protocol"):
        out, splitter = _parse(secret, b"".join(frames) + good)
    assert [m["t"] for m in out] == ["good"]
    assert splitter.rejected == len(bad_bodies) and caplog.text.count("does not decode") == len(bad_bodies)


def test_plain_and_chunked_macs_are_domain_separated():
    """Probe: a 104-byte body equal to the chunked MAC's input (its length and its chunks'
    SHA-256) had the large body's MAC, so it verified without the key."""
    key = protocol.new_secret()
    big = os.urandom(3 * protocol.HASH_CHUNK)
    chunks = [big[i:i + protocol.HASH_CHUNK] for i in range(0, len(big), protocol.HASH_CHUNK)]
    chunked_input = len(big).to_bytes(8, "big") + b"".join(hashlib.sha256(c).digest() for c in chunks)
    assert protocol._body_mac(key, [chunked_input]) != protocol._body_mac(key, [big])
    header = bytes(protocol.FrameSigner(key)._header(0, [memoryview(b"body")]))[:protocol._SIGNED_HEADER]
    assert protocol._header_mac(key, header) != protocol._body_mac(key, [header])


def test_an_authentic_header_longer_than_a_frame_is_refused():
    key = protocol.new_secret()
    start, after = _frames(key, [{"t": "start"}, {"t": "after"}], first_seq=1)
    too_long = protocol.MAX_FRAME_BODY + 1
    signed = protocol._HEADER.pack(protocol.MAGIC, protocol.VERSION, 0, bytes(16), 0, 7, too_long,
                                   bytes(32), bytes(32))[:protocol._SIGNED_HEADER]
    oversized = signed + protocol._header_mac(key, signed)
    out, _splitter = _parse(key, start + oversized + after[:3] + after)
    assert [m["t"] for m in out] == ["start", "after"]


# --- sequence numbers --------------------------------------------------------------------------
def test_replayed_and_reordered_frames_are_dropped(caplog):
    secret = protocol.new_secret()
    one, two, three, four = _frames(secret, [{"i": 1}, {"i": 2}, {"i": 3}, {"i": 4}])
    with caplog.at_level(logging.WARNING, logger="lepton_magic.protocol"):
        out, splitter = _parse(secret, one + one + three + two + four + four)
    assert [m["i"] for m in out] == [1, 3, 4]
    assert splitter.rejected == 3 and caplog.text.count("replayed or out-of-order") == 3


def test_each_sender_is_numbered_on_its_own():
    """Ranks number their frames themselves; the agent's frames between theirs do not clash."""
    node = protocol.new_secret()
    keys = {"": node, "r-1": protocol.run_key(node, "r-1")}
    agent = _frames(node, [{"t": "a1"}, {"t": "a2"}])
    rank0 = protocol.encode(keys["r-1"], {"t": "metrics"}, seq=1, channel="r-1", sender=0)
    rank1 = protocol.encode(keys["r-1"], {"t": "metrics"}, seq=1, channel="r-1", sender=1)
    splitter = protocol.FrameSplitter(keys.get)
    splitter.feed(agent[0] + rank0 + rank1 + agent[1] + rank1)
    assert [(f.channel, f.sender, m["t"]) for f, m in splitter.envelopes()] == [
        ("", 0, "a1"), ("r-1", 0, "metrics"), ("r-1", 1, "metrics"), ("", 0, "a2")]


# --- keys --------------------------------------------------------------------------------------
def test_key_derivation_is_hkdf_sha256():
    # RFC 5869, test case 1 (the first 32 bytes of its OKM)
    okm = protocol.derive_key(bytes([0x0B] * 22), bytes(range(0xF0, 0xFA)), salt=bytes(range(13)))
    assert okm.hex() == "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
    pool = protocol.new_secret()
    salt = os.urandom(16)
    keys = {protocol.node_key(pool, "local-0", salt), protocol.node_key(pool, "local-1", salt),
            protocol.node_key(pool, "local-0", os.urandom(16)), pool}
    assert len(keys) == 4
    node = protocol.node_key(pool, "local-0", salt)
    assert protocol.run_key(node, "r-1") == protocol.run_key(node, "r-1") != protocol.run_key(node, "r-2")


# --- a live agent ------------------------------------------------------------------------------
class LiveAgent:
    """An agent process fed by hand: the test plays the kernel (tests/test_protocol_fuzz.py too)."""

    def __init__(self, log_path):
        self.key = protocol.new_secret()
        self.log_path = log_path
        self.marker = 0.0  # of the last ping made
        with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would stop the agent
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lepton_magic.agent", "--node", "t0", "--preload", ""],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, bufsize=0)
        self.proc.stdin.write(self.key)
        self.signer = protocol.FrameSigner(self.key)
        self.inbox: queue.Queue = queue.Queue()
        self.reader = protocol.FrameReader(self.proc.stdout.fileno(), self._key_for, source="agent t0")
        threading.Thread(target=self._pump, daemon=True).start()
        assert self.expect("node", timeout=30), self.log()

    def _key_for(self, channel):  # as NodeLink's: its own key, or a run's
        return self.key if channel == "" else protocol.run_key(self.key, channel)

    def _pump(self):
        try:
            for message in self.reader:
                self.inbox.put(message)
        finally:
            self.inbox.put(None)

    def frame(self, message) -> bytes:
        """The next frame of this 'kernel', as bytes, not sent yet."""
        return b"".join(bytes(p) for parts in self.signer.frames(message) for p in parts)

    def write(self, data: bytes) -> None:
        self.proc.stdin.write(data)

    def send(self, message) -> None:
        self.write(self.frame(message))

    def expect(self, kind, timeout=10.0, where=lambda m: True):
        """The next message of ``kind`` (skipping others), or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.inbox.get(timeout=left)
            except queue.Empty:
                return None
            if message is None:
                return None
            if message["t"] == kind and where(message):
                return message
        return None

    def ping_frame(self) -> tuple[float, bytes]:
        self.marker += 1
        return self.marker, self.frame({"t": "ping", "time": self.marker})

    def answers_ping(self, timeout=10.0) -> bool:
        marker, frame = self.ping_frame()
        self.write(frame)
        return marker in self.pongs_until(marker, timeout)

    def pongs_until(self, marker, timeout=10.0) -> list:
        """The pings answered up to the one of ``marker``, which ends the list if it came."""
        answered = []
        while (pong := self.expect("pong", timeout)) is not None:
            answered.append(pong["sent"])
            if pong["sent"] == marker:
                break
        return answered

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def close(self) -> str:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(10)
        return self.log()


def job(code, run="r-1"):
    return {"t": "run", "run": run, "code": code, "line_offset": 1, "inputs": None, "outputs": [],
            "explicit_outputs": False, "node": "t0", "node_rank": 0, "nnodes": 1, "rank_offset": 0,
            "local_world_size": 1, "world_size": 1, "master_addr": "127.0.0.1", "master_port": 29999,
            "env": {}, "preload": False, "shm_dir": None, "threads": 1}


@pytest.fixture
def agent(tmp_path):
    live = LiveAgent(tmp_path / "agent.log")
    yield live
    live.close()


def test_a_live_agent_drops_what_it_cannot_use_and_lives(agent):
    """Probe: a signed frame whose meta length was decremented verified, and decoding it made
    the agent die with a traceback."""
    header_changed = bytearray(agent.frame({"t": "ping", "time": -1.0}))
    header_changed[3] ^= protocol.FINAL
    meta = msgpack.packb({"t": "ping", "time": -2.0})
    short_meta = bytes(agent.signer._header(0, [memoryview((len(meta) - 1).to_bytes(8, "big") + meta)]))
    short_meta += (len(meta) - 1).to_bytes(8, "big") + meta
    unusable = agent.frame({"t": "run", "run": "r-x"})  # signed, but no job in it
    marker, ping = agent.ping_frame()
    agent.write(bytes(header_changed) + short_meta + unusable + ping)
    assert agent.pongs_until(marker) == [marker], agent.log()  # the altered pings were not answered
    log = agent.log()
    assert "failed HMAC verification" in log and "does not decode" in log
    assert "dropped a 'run' message from the kernel (KeyError" in log
    assert "Traceback" not in log


def test_a_kernel_stream_that_is_not_lepton_ends_the_agent_cleanly(tmp_path):
    """The one input that stops an agent: a stream that never was lepton frames of this version
    (it cannot be resynchronised). It goes as when the kernel goes away: one line, no traceback."""
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen([sys.executable, "-m", "lepton_magic.agent", "--node", "t1",
                                  "--preload", ""],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, bufsize=0)
    agent.stdin.write(protocol.new_secret() + b"GET / HTTP/1.1\r\n" * 8)
    assert agent.wait(10) == 0
    agent.stdin.close()
    agent.stdout.close()
    log = (tmp_path / "agent.log").read_text()
    assert "not a lepton frame from kernel (bad magic b'GE'); exiting" in log and "Traceback" not in log


def test_an_agent_of_another_version_ends_its_link_with_the_reason():
    lost = []
    ours_r, theirs_w = os.pipe()
    theirs_r, ours_w = os.pipe()
    link = NodeLink("n0", ours_w, ours_r, protocol.new_secret(), lambda *a: None,
                    lambda _link, reason: lost.append(reason))
    old_frame = bytearray(_frames(protocol.new_secret(), [{"t": "node"}])[0])
    old_frame[2] = 1
    os.write(theirs_w, bytes(old_frame))
    link._thread.join(5)
    for fd in (ours_r, theirs_w, theirs_r, ours_w):
        os.close(fd)
    assert lost == [f"node n0 speaks lepton protocol version 1, this side speaks {protocol.VERSION}"]


def test_an_unauthenticated_length_allocates_nothing(agent):
    """Probe: a header claiming 2 GiB with a bogus MAC took the agent from 29 to 2,077 MiB
    (48 GiB: it exited with MemoryError); the frame after it was swallowed."""
    assert agent.answers_ping()
    before = agent.rss()
    bogus = protocol._HEADER.pack(protocol.MAGIC, protocol.VERSION, 0, bytes(16), 0, 99, (1 << 32) - 1,
                                  bytes(32), bytes(32))
    agent.write(bogus + os.urandom(4096))
    assert agent.answers_ping(), agent.log()
    time.sleep(0.3)
    assert agent.rss() - before < 16 << 20


def test_a_replayed_run_frame_runs_once(agent, tmp_path):
    """Probe: the same signed `run` frame written twice ran the cell twice."""
    marker = tmp_path / "ran"
    frame = agent.frame(job(f"open({str(marker)!r}, 'a').write('x')"))
    agent.write(frame + frame)
    assert agent.expect("exit", timeout=20), agent.log()
    assert agent.answers_ping()
    assert marker.read_text() == "x"
    assert "replayed or out-of-order" in agent.log()


SCAN_MEMORY = """
def count(needle):
    found = 0
    with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if 'r' not in perms or '[v' in line:
                continue
            start, end = (int(x, 16) for x in addr.split('-'))
            try:
                mem.seek(start)
                found += mem.read(end - start).count(needle)
            except (OSError, ValueError, OverflowError):
                pass
    return found

# Halves of each key ride in the code, so the code holds no whole key but the one it looks for.
counts = {name: count(bytes.fromhex(a) + bytes.fromhex(b)) - 1 for name, (a, b) in KEYS.items()}
print('counts', counts)
"""


def test_a_rank_holds_its_runs_key_and_no_other(agent):
    """Probe: a rank could read the pool key from its own memory."""
    halves = lambda k: (k[:16].hex(), k[16:].hex())  # noqa: E731
    keys = {"node": halves(agent.key), "this run": halves(protocol.run_key(agent.key, "r-1")),
            "another run": halves(protocol.run_key(agent.key, "r-2"))}
    agent.send(job(f"KEYS = {keys!r}\n" + SCAN_MEMORY))
    line = agent.expect("log", timeout=30, where=lambda m: any("counts" in x for x in m["lines"]))
    assert line is not None, agent.log()
    counts = eval(next(x for x in line["lines"] if "counts" in x).split(" ", 1)[1])
    assert counts["this run"] >= 1, "the scan does not find keys"
    assert counts["node"] == 0 and counts["another run"] == 0, counts


FORGE = """
import gc, os, sys
from lepton_magic import protocol
# Every key this process may hold: its signers' keys, and its stack's 32-byte strings.
keys = {o.key for o in gc.get_objects() if isinstance(o, protocol.FrameSigner)}
f = sys._getframe()
while f is not None:
    keys.update(v for v in list(f.f_locals.values()) if isinstance(v, bytes) and len(v) == 32)
    f = f.f_back
seq = 10**6
for key in keys:
    for channel, sender in (("r-1", 0), ("r-1", 5), ("r-other", 0), ("", 0)):
        for message in ({"t": "result", "run": "r-other", "rank": 0, "outputs": None, "forged": 1},
                        {"t": "exit", "run": "r-1", "rank": 0, "pid": 1, "killed": None, "forged": 1},
                        {"t": "started", "run": "r-1", "rank": 0, "pid": 1, "forged": 1},
                        {"t": "metrics", "run": "r-1", "rank": 5, "step": [0], "name": ["x"], "value": [1.0],
                         "time": [0.0], "forged": 1}):
            seq += 1
            os.write(3, protocol.encode(key, message, seq=seq, channel=channel, sender=sender))
print('forged', len(keys))
"""


def test_a_rank_speaks_for_its_own_run_and_rank_only(tmp_path):
    """Probe: the agent relayed a rank's frames for any run, so a rank could speak for another
    run (or for the agent) with the pool key it found in its memory."""
    received, ended = [], threading.Event()

    def on_message(_link, message):
        received.append(message)
        if message["t"] == "exit":
            ended.set()

    with open(tmp_path / "agent.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lepton_magic.agent", "--node", "t0", "--preload", ""],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, bufsize=0)
    link = NodeLink("t0", proc.stdin.fileno(), proc.stdout.fileno(), protocol.new_secret(), on_message,
                    lambda _link, reason: ended.set())
    try:
        assert link.ready.wait(30)
        link.send(job(FORGE))
        assert ended.wait(30)
    finally:
        proc.stdin.close()
        proc.wait(10)
    assert not [m for m in received if m.get("forged") or m.get("run") not in ("r-1", None)], received
    assert [m["t"] for m in received if m["t"] in ("started", "exit")] == ["started", "exit"]
    assert any("forged" in line for m in received if m["t"] == "log" for line in m["lines"])
    assert link.refused > 0  # relayed by the agent (its run's key, its rank) but not its to say
    agent_log = (tmp_path / "agent.log").read_text()
    assert "sent as rank 5" in agent_log and "Traceback" not in agent_log
