"""A one-line progress display on stderr (redrawn in place on a TTY, plain lines otherwise)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    def __init__(self, total_steps: int, stream: TextIO | None = None, plain_every_s: float = 5.0) -> None:
        self.total = max(1, total_steps)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.plain_every_s = plain_every_s
        self._last_plain = 0.0
        self._last_bytes: tuple[float, int] | None = None
        self._width = 0
        self._step = 0
        self._losses: list[float] = []

    def line(self, status: dict[str, Any], accuracy: float | None, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        workers = status.get("workers", [])
        alive = [w for w in workers if w.get("state") == "alive"]
        self._step = step = max(self._step, int(status.get("step", 0)))  # workers that left report 0
        losses = [w["loss"] for w in alive if w.get("loss") is not None] or self._losses
        self._losses = losses
        rate = sum(float(w.get("samples_per_s") or 0.0) for w in alive)
        sent = sum(int(w.get("bytes_sent") or 0) for w in workers)
        bps = 0.0
        if self._last_bytes is not None and now > self._last_bytes[0]:
            bps = max(0.0, (sent - self._last_bytes[1]) / (now - self._last_bytes[0]))
        self._last_bytes = (now, sent)
        filled = int(20 * min(step, self.total) / self.total)
        bar = "#" * filled + "." * (20 - filled)
        parts = [
            f"[{bar}] step {step}/{self.total}",
            f"loss {losses[0]:.4f}" if losses else "loss -",
            f"acc {100 * accuracy:.1f}%" if accuracy is not None else "acc -",
            f"{rate:.0f} samples/s",
            f"{human_bytes(bps)}/s",
            f"{len(alive)} workers",
            f"epoch {status.get('epoch', '?')}",
            str(status.get("state", "?")),
        ]
        return "  ".join(parts)

    def show(self, status: dict[str, Any], accuracy: float | None) -> None:
        text = self.line(status, accuracy)
        if self.tty:
            pad = " " * max(0, self._width - len(text))
            self.stream.write("\r" + text + pad)
            self._width = len(text)
        else:
            now = time.monotonic()
            if now - self._last_plain < self.plain_every_s:
                return
            self._last_plain = now
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
