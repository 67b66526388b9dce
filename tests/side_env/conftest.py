"""The side environment's files are not tests: pytest does not look inside its installed packages."""

collect_ignore = ["site"]
