"""cbt-agent: changed-block tracking for KVM hosts."""

__version__ = "0.1.0"
