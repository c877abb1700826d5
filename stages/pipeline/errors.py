"""User errors: one line on stderr, exit code 2, no traceback."""
import sys


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2, no traceback."""


def run_stage(main) -> None:
    """Runs a stage's main(); a UserError becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

