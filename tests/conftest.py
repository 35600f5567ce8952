import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests share small fixtures as plain modules
os.environ.setdefault("TOOLKIT_SCALE", "tiny")
