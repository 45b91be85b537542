"""Command-line conventions shared by the launch tools: bad input is one line and exit 2."""
import argparse


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line on stderr, with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
