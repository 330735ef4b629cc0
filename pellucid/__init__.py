"""pellucid: a complete large-language-model stack you can read end to end."""

__version__ = "0.1.0"
