"""Hostile input: an adversarial request set, fuzzing of intake and schema checks."""
