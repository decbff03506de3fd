"""The device lifecycle's model checker (issue 20): ``python -m tests.model --depth N``."""
