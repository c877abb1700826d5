"""User errors: one line on stderr, exit code 2, no traceback."""
import os
import sys
from pathlib import Path

PROCESS_ERRORS = "STAGES_PROCESS_ERRORS"  # a folder, when a stage relaunched itself under torchrun


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2, no traceback."""


def run_stage(main) -> None:
    """Runs a stage's main(); a UserError becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as error:
        if said_to_launcher(str(error)):
            sys.stdout.flush()
            os._exit(2)  # at once: a process group's C++ threads abort an interpreter that exits with them alive
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def said_to_launcher(message: str) -> bool:
    """A process under torchrun leaves its line to the launcher, which prints one line for all of
    them after they are gone: torch's C++ warnings, printed as a process group dies, would follow it."""
    folder = os.environ.get(PROCESS_ERRORS)
    if folder and "LOCAL_RANK" in os.environ:
        Path(folder, os.environ["LOCAL_RANK"]).write_text(message)
        return True
    return False


def said_by_processes(folder: Path) -> str | None:
    """The first line that a process under torchrun left in `folder`, if any."""
    lines = sorted(folder.iterdir())
    return lines[0].read_text() if lines else None
