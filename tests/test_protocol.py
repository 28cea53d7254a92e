import logging
import os
import threading

import msgpack
import pytest

from lepton_magic import protocol


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


def test_tampered_frame_is_dropped_before_decoding(caplog):
    secret = protocol.new_secret()
    good = protocol.encode(secret, {"t": "x", "n": 1})
    tampered = bytearray(protocol.encode(secret, {"t": "run", "n": 2}))
    tampered[-1] ^= 0x01  # flip one bit of the body
    forged = protocol.encode(protocol.new_secret(), {"t": "run", "n": 3})  # wrong key
    splitter = protocol.FrameSplitter(secret, "test peer")
    splitter.feed(bytes(tampered) + forged + good)
    with caplog.at_level(logging.WARNING, logger="lepton_magic.protocol"):
        out = list(splitter.messages())
    assert out == [{"t": "x", "n": 1}]
    assert splitter.rejected == 2
    assert "failed HMAC verification" in caplog.text


def test_body_is_not_decoded_when_the_mac_is_wrong(monkeypatch):
    calls = []
    monkeypatch.setattr(protocol, "decode_body", lambda n, body: calls.append(body) or msgpack.unpackb(body))
    secret = protocol.new_secret()
    forged = protocol.encode(b"k" * 32, {"t": "run"})
    splitter = protocol.FrameSplitter(secret)
    splitter.feed(forged)
    assert list(splitter.messages()) == []
    assert calls == []


def test_buffers_travel_out_of_band():
    secret = protocol.new_secret()
    r, w = os.pipe()
    big = bytearray(os.urandom(13 << 20))  # over the parallel-hash threshold, split across parts
    small = b"abc"
    writer = protocol.FrameWriter(w, secret)
    threading.Thread(target=lambda: (writer.send({"t": "r", "_buffers": [big, small]}), os.close(w))).start()
    message = protocol.FrameReader(r, secret).read()
    os.close(r)
    assert [bytes(b) for b in message["_buffers"]] == [bytes(big), small]
    assert "_lens" not in message


def test_version_and_magic_are_checked():
    secret = protocol.new_secret()
    frame = bytearray(protocol.encode(secret, {"t": "x"}))
    frame[2] = protocol.VERSION + 1
    splitter = protocol.FrameSplitter(secret, "old agent")
    with pytest.raises(protocol.ProtocolError, match="version"):
        splitter.feed(bytes(frame))
    splitter = protocol.FrameSplitter(secret)
    with pytest.raises(protocol.ProtocolError, match="bad magic"):
        splitter.feed(b"GET / HTTP/1.1\r\n" * 4)


def test_frames_split_at_any_byte_boundary():
    secret = protocol.new_secret()
    stream = b"".join(protocol.encode(secret, {"i": i, "pad": "x" * i}) for i in range(50))
    splitter = protocol.FrameSplitter(secret)
    got = []
    for i in range(0, len(stream), 7):
        splitter.feed(stream[i:i + 7])
        got.extend(m["i"] for m in splitter.messages())
    assert got == list(range(50))
