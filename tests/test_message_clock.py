"""The clock behind --message-timeout reads frame headers as they go by: whatever way the bytes
are cut into reads, it must know exactly when a message is unfinished, or a trickled message
escapes the limit, or an honest one is cut off."""

from __future__ import annotations

from itertools import accumulate

from hypothesis import given
from hypothesis import strategies as st

from adversarial.target import ws_frame
from hived.hive.coordinator.deadlines import FrameClock

# Payload lengths on each side of the header's 7-bit, 16-bit and 64-bit forms.
LENGTHS = st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 70000])


@st.composite
def messages(draw) -> list[tuple[bytes, bool]]:
    """Frames, each with whether a message is unfinished after it: data messages in one or more
    fragments, pings and pongs between messages and between a message's fragments."""
    frames = []
    for _ in range(draw(st.integers(1, 4))):
        fragments = draw(st.integers(1, 3))
        for i in range(fragments):
            if draw(st.booleans()):
                frames.append((ws_frame(draw(st.sampled_from([9, 10])), b"p" * draw(st.integers(0, 125))), i > 0))
            opcode = draw(st.sampled_from([1, 2])) if i == 0 else 0
            last = i == fragments - 1
            frames.append((ws_frame(opcode, b"\x07" * draw(LENGTHS), fin=last), not last))
    return frames


@given(messages(), st.lists(st.integers(1, 70_000), max_size=40))
def test_the_clock_runs_exactly_while_a_message_or_frame_is_unfinished(frames, cuts):
    stream = b"".join(f for f, _ in frames)
    ends = {}  # offset where a frame ends → whether a message is still unfinished there
    offset = 0
    for frame, unfinished in frames:
        offset += len(frame)
        ends[offset] = unfinished
    points = sorted({min(c, len(stream)) for c in accumulate(cuts)} | set(ends) | {len(stream)})
    now = [0.0]
    clock = FrameClock(lambda: now[0])
    last = 0
    for point in points:
        now[0] += 1
        clock.feed(memoryview(stream)[last:point])
        last = point
        if point in ends and not ends[point]:
            assert clock.since is None, f"stopped at {point} of {len(stream)}"
        else:
            assert clock.since is not None, f"idle at {point} of {len(stream)}, inside a message or frame"
    assert clock.since is None


def test_the_clock_keeps_the_time_the_message_began():
    now = [10.0]
    clock = FrameClock(lambda: now[0])
    frame = ws_frame(2, b"x" * 1000)
    clock.feed(frame[:1])
    now[0] = 20.0
    clock.feed(frame[1:500])
    assert clock.since == 10.0
    clock.feed(frame[500:])
    assert clock.since is None

