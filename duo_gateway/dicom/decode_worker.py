"""The pixel data codecs in a helper process: a decoder that hangs or aborts costs one instance, not DUO.

Why a process: :mod:`duo_gateway.dicom.transcode` hands other organisations' compressed pixel data to
C/C++ codecs, and those fail in ways no ``except`` reaches. Seen here: CharLS (pyjpegls 1.5) loops
forever on some truncated JPEG-LS streams, and GDCM ends the process with ``std::terminate`` on some
input it rejects. In the daemon the first would hold the C-STORE worker thread (and a core) for good,
the second would end every transfer, timeline and XCA answer at once.

How:

- **One helper per :class:`DecodeWorker`**, started on first use as ``python -m
  duo_gateway.dicom.decode_worker`` (the same interpreter and ``sys.path``), and kept for the next
  instance. A :class:`~duo_gateway.dicom.store_scu.StoreClient` owns one and uses it from its single
  worker thread, so requests never interleave. Starting costs the import of pydicom, numpy and the
  codecs (about 0.5 s, a few s on a loaded machine): paid once, and only by a transfer that needs it.
- **JSON lines on the helper's stdin/stdout.** The helper reports every decoded frame; when none came
  for ``stall_s`` the helper is killed (a hang) and the next request starts a new one. A helper that
  dies mid-request (abort, a signal, the OOM killer) is a verdict on that stream: ``corrupt``.
- **Plain subprocess, not multiprocessing.** A forkserver child re-runs a script ``__main__`` (the
  ``duo-gateway`` console script would import the whole gateway per child), and forking the threaded
  daemon itself is unsafe.
- **Nothing from the helper reaches the logs.** C libraries may write to fd 1 and 2: the helper points
  both at /dev/null (the protocol uses a duplicate of fd 1), because decoder messages can quote
  element values.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from pydicom.uid import UID

from duo_gateway.dicom.transcode import Decompressed, TranscodeError, decompress_file

#: Seconds the helper may go without finishing a frame before it counts as hung and is killed.
#: Generous: one frame of a large mammogram takes seconds on a loaded machine.
DECODE_STALL_S: Final = 60.0
#: Seconds a new helper may take to import the codecs and say it is ready.
START_S: Final = 60.0

_MODULE: Final = "duo_gateway.dicom.decode_worker"


class WorkerUnavailable(OSError):
    """The helper could not be started: DUO's own problem, not the instance's (so worth a retry)."""


class DecodeWorker:
    """Runs :func:`~duo_gateway.dicom.transcode.decompress_file` in a helper process, one file at a time.

    Blocking; use it from one worker thread, never on the event loop. :meth:`close` ends the helper.
    """

    def __init__(self, *, stall_s: float = DECODE_STALL_S, start_s: float = START_S) -> None:
        self.stall_s = stall_s
        self.start_s = start_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        #: Helpers started so far (a restart follows every hang or crash): for tests and logs.
        self.started = 0

    def decompress(self, src: Path, dst: Path, target: str,
                   progress: Callable[[], None] | None = None) -> Decompressed:
        """Decompress ``src`` into ``dst`` as ``target`` in the helper; ``progress`` per decoded frame.

        Raises TranscodeError (the stream: lossy, unsupported, corrupt, or the decoder hung/crashed on
        it), OSError (files), WorkerUnavailable (no helper).
        """
        proc = self._ensure()
        if progress is not None:
            progress()  # a helper's start is a sign of life too (it can take seconds)
        request = json.dumps({"src": str(src), "dst": str(dst), "target": str(target)}).encode() + b"\n"
        try:
            assert proc.stdin is not None
            proc.stdin.write(request)
            proc.stdin.flush()
        except OSError as exc:
            self.close()
            raise WorkerUnavailable(f"the decoder helper stopped taking requests: {exc}") from None
        while True:
            try:
                message = self._read(proc, self.stall_s)
            except EOFError:
                code = self._reap(proc)
                raise TranscodeError("corrupt", f"the decoder {_how(code)} on this stream") from None
            if message is None:
                self.close()
                raise TranscodeError("corrupt", f"the decoder made no progress for {self.stall_s:g} s "
                                     "(hung on this stream) and was stopped")
            if "frame" in message:
                if progress is not None:
                    progress()
                continue
            return _verdict(message)

    def close(self) -> None:
        """Stop the helper (it also exits by itself when its stdin closes)."""
        proc, self._proc = self._proc, None
        self._buffer = b""
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        self._reap(proc)

    # -- the helper's lifecycle -------------------------------------------------------------------

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self.close()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            proc = subprocess.Popen([sys.executable, "-m", _MODULE], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                    close_fds=True, start_new_session=True)
        except OSError as exc:
            raise WorkerUnavailable(f"could not start the decoder helper: {exc}") from None
        self._proc = proc
        self.started += 1
        try:
            ready = self._read(proc, self.start_s)
        except EOFError:
            code = self._reap(proc)
            self._proc = None
            raise WorkerUnavailable(f"the decoder helper {_how(code)} while starting") from None
        if ready is None or not ready.get("ready"):
            self.close()
            raise WorkerUnavailable(f"the decoder helper was not ready within {self.start_s:g} s")
        return proc

    def _read(self, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any] | None:
        """The helper's next message; None when none came within ``timeout``; EOFError when it ended."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def _reap(self, proc: subprocess.Popen[bytes]) -> int | None:
        if self._proc is proc:
            self._proc = None
        self._buffer = b""
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        return code


def _how(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"ended (exit status {code})"


def _verdict(message: dict[str, Any]) -> Decompressed:
    if "ok" in message:
        done = message["ok"]
        return Decompressed(UID(done["source_syntax"]), UID(done["target_syntax"]), int(done["frames"]),
                            done["photometric_interpretation"])
    if "oserror" in message:
        raise OSError(message["oserror"], message["detail"])
    raise TranscodeError(message["error"], message["detail"])


# -- the helper side ----------------------------------------------------------------------------------


def main() -> None:
    """Serve requests from stdin until it closes; one JSON line per frame done and one per answer."""
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)

    def send(message: dict[str, Any]) -> None:
        out.write(json.dumps(message).encode() + b"\n")

    send({"ready": True})
    frames = 0

    def tick() -> None:
        nonlocal frames
        frames += 1
        send({"frame": frames})

    for line in sys.stdin.buffer:
        request = json.loads(line)
        frames = 0
        try:
            done = decompress_file(Path(request["src"]), Path(request["dst"]), request["target"], tick)
            send({"ok": {"source_syntax": str(done.source_syntax), "target_syntax": str(done.target_syntax),
                         "frames": done.frames,
                         "photometric_interpretation": done.photometric_interpretation}})
        except TranscodeError as exc:
            send({"error": exc.reason, "detail": exc.detail})
        except OSError as exc:
            send({"oserror": exc.errno, "detail": str(exc)})
        except Exception as exc:
            # Whatever else a decoder raised is about this stream, like the errors transcode wraps.
            send({"error": "corrupt", "detail": f"{type(exc).__name__}: {exc}"[:300]})


if __name__ == "__main__":
    main()


class SharedDecodeWorker:
    """One :class:`DecodeWorker` for callers on many threads (RAD-75 answers running side by side).

    Decoding is serialized: one helper's memory and one core is what conversion may cost the daemon,
    and a converted instance is the exception (a PACS that sends what was not asked, by C-MOVE).
    """

    def __init__(self, *, stall_s: float = DECODE_STALL_S) -> None:
        self._lock = threading.Lock()
        self._worker = DecodeWorker(stall_s=stall_s)

    def decompress(self, src: Path, dst: Path, target: str) -> Decompressed:
        """As :meth:`DecodeWorker.decompress`; blocking, so call it from a worker thread."""
        with self._lock:
            return self._worker.decompress(src, dst, target)

    def close(self) -> None:
        with self._lock:
            self._worker.close()


__all__ = ["DECODE_STALL_S", "START_S", "DecodeWorker", "SharedDecodeWorker", "WorkerUnavailable"]
