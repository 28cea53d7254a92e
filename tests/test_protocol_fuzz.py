"""Fuzzing a live agent's kernel stream (hypothesis): random bytes, truncated, bit-flipped,
replayed, re-ordered frames, oversized length fields, authentic headers with bogus bodies.

After each example the agent must have answered exactly the genuine, fresh pings; after all of
them it must still be up, run a tiny job, and have grown by less than 64 MiB. The kernel's
reader uses the same splitter: fuzzed in-process below, where examples are cheap.
"""

import collections
import os
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton_magic import protocol
from test_protocol import LiveAgent, job

KINDS = ("random_bytes", "truncated", "bit_flipped", "replayed", "reordered", "oversized_length",
         "bogus_body", "undecodable_body")
ATTACK = st.one_of(
    st.tuples(st.just("random_bytes"), st.binary(min_size=1, max_size=4096)),
    st.tuples(st.just("truncated"), st.integers(min_value=1, max_value=1 << 16)),
    st.tuples(st.just("bit_flipped"), st.integers(min_value=0, max_value=1 << 16)),
    st.tuples(st.just("replayed"), st.integers(min_value=0, max_value=1 << 16)),
    st.tuples(st.just("reordered"), st.permutations(range(4))),
    st.tuples(st.just("oversized_length"), st.integers(min_value=protocol.MAX_FRAME_BODY + 1,
                                                       max_value=(1 << 32) - 1)),
    st.tuples(st.just("bogus_body"), st.binary(min_size=1, max_size=256)),
    st.tuples(st.just("undecodable_body"), st.binary(min_size=0, max_size=256)),
)
#: The fields after the magic, version and flags: channel, sender, sequence, then the length.
_LENGTH_AT = 2 + 1 + 1 + protocol.CHANNEL_SIZE + 4 + 8


class Kernel:
    """Plays the kernel: writes attacks, knows which of its pings the agent must answer."""

    def __init__(self, agent: LiveAgent):
        self.agent = agent
        self.answered: list[bytes] = []  # genuine frames the agent took, for replays
        self.tried = collections.Counter()

    def attack(self, kind: str, arg) -> list[float]:
        """Write one attack; return the markers of the pings in it the agent must answer."""
        self.tried[kind] += 1
        agent = self.agent
        if kind == "random_bytes":
            agent.write(arg)
            return []
        if kind == "replayed":
            if self.answered:
                agent.write(self.answered[arg % len(self.answered)])
            return []
        if kind == "reordered":
            pings = [agent.ping_frame() for _ in arg]
            newest, fresh = 0, []
            for i in arg:  # the agent takes a frame only if it is newer than every one before
                agent.write(pings[i][1])
                if i >= newest:
                    newest = i + 1
                    fresh.append(pings[i][0])
                    self.answered.append(pings[i][1])
            return fresh
        _marker, frame = agent.ping_frame()
        agent.write(self._spoiled(kind, arg, bytearray(frame)))
        return []

    def _spoiled(self, kind: str, arg, frame: bytearray) -> bytes:
        if kind == "truncated":
            # Cut short, the rest of its length filled with other bytes: a frame cut short and
            # followed by nothing would swallow the next one (see protocol's docstring).
            cut = 1 + arg % (len(frame) - 1)
            return bytes(frame[:cut]) + bytes(b ^ 0xFF for b in frame[cut:])
        if kind == "bit_flipped":
            bit = arg % (8 * len(frame))
            frame[bit // 8] ^= 1 << (bit % 8)
            return bytes(frame)
        if kind == "oversized_length":
            frame[_LENGTH_AT:_LENGTH_AT + 4] = arg.to_bytes(4, "big")
            return bytes(frame)
        if kind == "bogus_body":  # an authentic header, another body of its length
            genuine = bytes(frame[protocol.HEADER_SIZE:])
            body = bytearray((arg * len(frame))[:len(genuine)])
            if body == genuine:
                body[0] ^= 0x01
            return bytes(frame[:protocol.HEADER_SIZE]) + body
        assert kind == "undecodable_body"  # signed by the key holder, but not a message
        header = bytes(self.agent.signer._header(0, [memoryview(arg)]))
        return header + arg


def test_a_live_agent_survives_fuzzed_frames(tmp_path, capsys):
    agent = LiveAgent(tmp_path / "agent.log")
    try:
        assert agent.answers_ping()
        rss_before = agent.rss()
        kernel = Kernel(agent)

        @settings(max_examples=400, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(attacks=st.lists(ATTACK, min_size=1, max_size=6))
        def fuzz(attacks):
            expected = []
            for kind, arg in attacks:
                expected += kernel.attack(kind, arg)
            marker, ping = agent.ping_frame()
            agent.write(ping)
            kernel.answered.append(ping)
            assert agent.pongs_until(marker) == expected + [marker], (attacks, agent.log()[-2000:])

        fuzz()
        assert agent.proc.poll() is None, agent.log()[-2000:]
        agent.send(job("print('still here')", run="r-after"))
        done = agent.expect("result", timeout=30, where=lambda m: m["run"] == "r-after")
        assert done is not None, agent.log()[-2000:]
        grown = agent.rss() - rss_before
        assert grown < 64 << 20, f"the agent grew by {grown >> 20} MiB"
    finally:
        log = agent.close()
    dropped = collections.Counter(_why(line) for line in log.splitlines() if "dropped" in line)
    with capsys.disabled():  # the counts show in every run, not only with -s
        print(f"\nfuzzed a live agent: {sum(kernel.tried.values())} attacks, by kind {dict(kernel.tried)}; "
              f"its log reports {sum(dropped.values())} drops: {dict(dropped)}; "
              f"it grew by {grown / 2**20:.1f} MiB")
    assert set(kernel.tried) == set(KINDS)
    assert "Traceback" not in log


def _why(line: str) -> str:
    for reason in ("not an authentic frame", "failed HMAC verification", "replayed or out-of-order",
                   "does not decode"):
        if reason in line:
            return reason
    return re.sub(r"[0-9.]+", "N", line)[:80]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(stream=st.lists(st.one_of(st.binary(min_size=1, max_size=300), st.integers(0, 3)), max_size=12))
def test_genuine_frames_come_through_any_garbage_between_them(stream):
    """Bytes between frames never cost a genuine frame, never raise, and never stop the stream
    (garbage has no authentic header, so it cannot claim a length)."""
    key = protocol.new_secret()
    signer = protocol.FrameSigner(key)
    genuine = [{"t": "start"}] + [{"t": "m", "i": i, "pad": b"x" * (i * 997 % 5000)}
                                  for i, part in enumerate(stream) if isinstance(part, int)]
    frames = iter(b"".join(bytes(p) for parts in signer.frames(m) for p in parts) for m in genuine)
    data = next(frames) + b"".join(part if isinstance(part, bytes) else next(frames) for part in stream)
    splitter = protocol.FrameSplitter(key, "fuzz")
    for i in range(0, len(data), 777):
        splitter.feed(data[i:i + 777])
    assert list(splitter.messages()) == genuine
