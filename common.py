"""What every script shares: the error types (a user's mistake is one line, never a
traceback), the argument parser that says so, the one error handler of every script's
`__main__`, writing files so that a kill leaves the old or the new file whole, and small helpers
for files and printing.
"""
import argparse
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import unicodedata

# ------------------------------------------------------------------------------------------- errors
# Each names what went wrong and where (file and line, flag, field) in one line. run_script turns
# them into that line and an exit status: 2 for bad input (DataError, ModelError), 1 for a run
# that failed (TrainingError, SaveError), 130 for Ctrl-C.


class DataError(ValueError):
    """Bad input a user can cause; the message is one line naming the file and line."""


class ModelError(ValueError):
    """A model that cannot be built or loaded; the message is one line."""


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, out of memory); the message is one line."""


class SaveError(RuntimeError):
    """A file could not be written (disk full, read-only, no permission); one line."""


def run_script(main, interrupted="interrupted"):
    """Run a script's main(): its errors as one line each and an exit status, no traceback."""
    try:
        main()
    except (DataError, ModelError) as e:
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
    except (TrainingError, SaveError) as e:
        sys.exit(print(f"error: {e}", file=sys.stderr) or 1)
    except KeyboardInterrupt:
        sys.exit(print(interrupted, file=sys.stderr) or 130)


class ArgumentParser(argparse.ArgumentParser):
    """Bad flags get one line naming the flag and what is allowed, not the whole usage; exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


# -------------------------------------------------------------------------------------------- files

def write_atomic(path, write):
    """Call write(temporary path), fsync, then rename over path: a kill leaves old or new, never
    half. Every file this repository writes goes through here."""
    tmp = None
    try:
        # In the same folder as path: a rename across file systems would copy, not swap at once
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; checkpoints are meant to be shared
        with open(tmp, "rb+") as f:
            # On disk before the rename: after a power cut the new name never points at missing data
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if not cannot_write(e, os.path.dirname(path) or "."):
            raise
        reason = e.strerror if isinstance(e, OSError) else "No space left on device"
        raise SaveError(f"{path}: cannot write ({reason}); what was saved before is intact") \
            from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def cannot_write(error, folder):
    """A full disk, a read-only file system or no permission. safetensors says it in words and
    torch.save as an internal error, so for those the disk itself is asked."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)
    # Under 1 MiB free: the failed write most likely ran out of room
    return "No space left on device" in str(error) or shutil.disk_usage(folder).free < 1 << 20


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def printable(text):
    """text with control characters and line separators shown as escapes (\\x1b, \\n, \\u2028):
    what came from input cannot move the cursor or add lines where it is printed."""
    return "".join(c.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text)
