"""Experiment runner (placeholder until the runner lands)."""


def add_arguments(parser) -> None:
    pass


def main(args) -> None:
    raise SystemExit("the runner is not implemented yet")
