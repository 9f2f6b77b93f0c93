import sys

from bigscience_train.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
