"""Recipes x samplers at an equal budget: `run` trains and scores, `variants` names what is
compared, `data` makes the data and classifier portable to a machine without TFDS."""
