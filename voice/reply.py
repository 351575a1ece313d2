"""The reply step: a transcript in, the words to speak out.  Replace it with your LLM call.

A reply hook is any ``async def reply(turn: Turn) -> str`` (or an async
generator of text pieces, each spoken as soon as it arrives, so an LLM's
stream can start speaking at its first sentence).  Plug one in with
``voice:reply=mypackage.module:function`` on ``--handler`` or pass
``reply=`` to ``VoiceHandler``.  The agent

* runs it in its own task and cancels it after ``reply_timeout`` seconds
  (a hook that raises or hangs costs one turn, never the call: the caller
  hears nothing, the data channel gets a ``reply_error`` event);
* cancels it (``asyncio.CancelledError`` inside the hook) when the caller
  barges in, and sets ``turn.interrupted`` so a hook that keeps history
  knows its last answer was cut off (``turn.spoken`` says how much was said).

The default, ``rules``, answers a small command set with no model at all.
Its phrases are also the speech recogniser's grammar (``COMMANDS``), so the
two stay one list.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()


@dataclass
class Turn:
    """One caller turn as the reply hook sees it."""

    transcript: str
    index: int                       # 0, 1, ... within the call
    history: list[tuple[str, str]] = field(default_factory=list)  # (caller, agent) of earlier turns
    interrupted: bool = False        # set when the caller barged in on this turn's answer
    spoken: str = ""                 # the part of the answer that was queued before the barge-in


ReplyHook = Callable[[Turn], Awaitable[str] | AsyncIterator[str]]


def _clock(now: datetime) -> str:
    hour = now.hour % 12 or 12
    minute = "o'clock" if now.minute == 0 else (f"oh {now.minute}" if now.minute < 10 else str(now.minute))
    return f"It is {hour} {minute}."


STORY = ("Once upon a time there was a relay that forwarded every packet in the kernel. "
         "It never copied a byte it did not need to, and the voices that crossed it arrived on time. "
         "One day a caller asked it for a story, and it began to tell this one, slowly, sentence by sentence, "
         "until the caller interrupted it.")

# phrase -> answer (a string or a function of the time).  The phrases are the recogniser's grammar.
COMMANDS: dict[str, str | Callable[[datetime], str]] = {
    "what time is it": _clock,
    "what is the time": _clock,
    "what day is it": lambda now: f"It is {now:%A}.",
    "what is the date": lambda now: f"It is {now:%A}, {now:%B} {now.day}.",
    "hello": "Hello. How can I help?",
    "good morning": "Good morning to you too.",
    "how are you": "I am fine, thank you.",
    "what is your name": "I am the split relay voice agent.",
    "what can you do": "I can tell you the time, the date, a joke or a story.",
    "help": "Ask me the time, the date, a joke or a story.",
    "tell me a joke": "Why did the packet cross the relay? To get to the other side, in the kernel.",
    "tell me a story": STORY,
    "count to five": "one, two, three, four, five.",
    "count to ten": "one, two, three, four, five, six, seven, eight, nine, ten.",
    "are you there": "Yes, I am here.",
    "thank you": "You are welcome.",
    "goodbye": "Goodbye.",
    "stop": "",
    "wait": "",
    "what is the weather": "I cannot see outside, sorry.",
    "turn on the lights": "I cannot control the lights.",
    "play some music": "I only know how to talk.",
    "say something": "Something. There, I said it.",
}


# what a listener says to keep the speaker going: with ``backchannel=on`` the agent holds its answer for these
# and goes on (they join the recogniser's grammar only then, so the command set's accuracy is untouched)
BACKCHANNELS = ("uh huh", "yeah", "okay", "right", "mhm", "yes", "sure")


async def rules(turn: Turn) -> str:
    """The built-in reply: a fixed answer per command, the time and date, else the transcript echoed."""
    text = " ".join(turn.transcript.lower().split())
    answer = COMMANDS.get(text)
    if answer is None:
        return f"You said: {turn.transcript}." if text else ""
    return answer(datetime.now()) if callable(answer) else answer


async def echo(turn: Turn) -> str:
    """Repeats the transcript (a reply hook for dictation tests)."""
    return turn.transcript


BUILTIN_REPLIES: dict[str, ReplyHook] = {"rules": rules, "echo": echo}


def load_reply(spec: str | ReplyHook) -> ReplyHook:
    """``"rules"``, ``"echo"``, ``"package.module:function"`` or a callable."""
    if callable(spec):
        return spec
    if spec in BUILTIN_REPLIES:
        return BUILTIN_REPLIES[spec]
    module, colon, name = spec.partition(":")
    if not colon:
        raise ValueError(f"reply {spec!r}: use rules, echo or package.module:function")
    try:
        hook = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reply {spec!r}: {exc}") from None
    if not callable(hook):
        raise ValueError(f"reply {spec!r} is not callable")
    return hook


async def reply_pieces(hook: ReplyHook, turn: Turn, timeout: float) -> AsyncIterator[str]:
    """The hook's answer as text pieces; ``TimeoutError`` when it has not finished in ``timeout`` s.

    The limit covers the whole answer (a streaming hook that stalls half-way is cut off too).
    """
    deadline = time.monotonic() + timeout
    result = hook(turn)
    if hasattr(result, "__aiter__"):
        iterator = result.__aiter__()
        try:
            while True:
                try:
                    piece = await asyncio.wait_for(iterator.__anext__(), max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    return
                yield str(piece)
        finally:
            if hasattr(iterator, "aclose"):
                await iterator.aclose()
    else:
        yield str(await asyncio.wait_for(result, timeout))
