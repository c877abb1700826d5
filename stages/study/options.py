"""Command-line options shared by the study and its report: one-line mistakes, comma-separated lists."""
import argparse

from stages.pipeline.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one line, exit code 2, no usage."""

    def error(self, message):
        raise UserError(message)


def comma_list(option: str, text: str) -> list[str]:
    """A comma-separated list with no empty or repeated item."""
    items = [item.strip() for item in text.split(",")]
    if not all(items) or len(set(items)) != len(items):
        raise UserError(f"{option} {text!r}: must be a comma-separated list with no empty or repeated item")
    return items


def seed_list(text: str) -> list[int]:
    """--seeds: integers >= 0, comma-separated."""
    seeds = comma_list("--seeds", text)
    if not all(s.isdigit() for s in seeds):
        raise UserError(f"--seeds {text}: must be integers >= 0, comma-separated, e.g. 0,1,2")
    return [int(s) for s in seeds]
