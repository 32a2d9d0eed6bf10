"""Entry point of every recipe: `composer train.py yamls/<recipe>.yaml [key=value ...]`.

The logic lives in llmshearing.train (builders, run) so that it can be imported and tested.
"""
import sys

from llmshearing.train.run import main

if __name__ == "__main__":
    sys.exit(main())
