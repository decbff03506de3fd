"""The project's own fault campaign (issue 10); see docs/faults.md."""
