"""What a soak run does and when: the nominal hour and its scaling to a run's length (bench/soak.py)."""

from __future__ import annotations

from dataclasses import dataclass

NOMINAL_MINUTES = 60.0
RELOAD_EVERY_S, RESTART_EVERY_S = 300.0, 900.0    # the nominal hour's: every 5 and every 15 minutes
RELOAD_FLOOR_S, RESTART_FLOOR_S = 30.0, 60.0      # each costs a bcc compile: ~4-10 s of a core on this host
CALL_MIN_S, CALL_MAX_S = 10.0, 120.0


@dataclass
class SoakPlan:
    """What a run does and when; ``plan()`` scales the nominal hour to ``minutes``."""

    minutes: float
    concurrency: int
    call_min_s: float
    call_max_s: float
    reload_every_s: float
    restart_every_s: float
    kill_at_s: float
    sample_s: float
    warmup_s: float

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0


def plan(minutes: float, concurrency: int | None = None, call_s: tuple[float, float] | None = None) -> SoakPlan:
    """The nominal hour (30 calls of 10-120 s; reload every 5 min, agent restart every 15, one worker
    kill; a sample a minute; 5 minutes warm-up) scaled to ``minutes``: every interval times minutes/60,
    but a reload not more often than every 30 s and a restart every 60 s (each compiles the program);
    calls at most a sixth of the run (so each slot churns several times), at least 10-20 s; concurrency
    30 from 10 minutes, 3 below (the CI's 3 minutes on this 2-core host, shared: 9 callers dropped calls
    at load 9-13, 3 did not; RELIABILITY.md); sample every minutes/60 min, at least 5 s; the warm-up
    is the first fifth of a shorter run.  The worker kill is half a reload interval after the middle,
    so it never meets a reload or a restart."""
    scale = minutes / NOMINAL_MINUTES
    lo, hi = call_s or (CALL_MIN_S, max(CALL_MIN_S + 10.0, min(CALL_MAX_S, minutes * 60.0 / 6)))
    reload_every = max(RELOAD_FLOOR_S, RELOAD_EVERY_S * scale)
    concurrency = concurrency or (30 if minutes >= 10 else 3)
    return SoakPlan(minutes=minutes, concurrency=concurrency,
                    call_min_s=lo, call_max_s=hi, reload_every_s=reload_every,
                    restart_every_s=max(RESTART_FLOOR_S, RESTART_EVERY_S * scale),
                    kill_at_s=minutes * 30.0 + reload_every / 2, sample_s=max(5.0, 60.0 * scale),
                    warmup_s=min(300.0, minutes * 12.0))
