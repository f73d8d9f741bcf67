"""``python -m fastlm.train`` / ``deepspeed --module fastlm.train CONFIG``."""

import sys

from fastlm.cli import main

if __name__ == "__main__":
    # The deepspeed launcher runs `python -u -m fastlm.train --local_rank=N CONFIG ...`.
    sys.exit(main(["train", *sys.argv[1:]]))
