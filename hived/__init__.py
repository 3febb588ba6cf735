"""hived: train your own small GPT from scratch, alone, with a volunteer hive, or on a Ray cluster."""

__version__ = "0.1.0"
