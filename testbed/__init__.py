"""Development tools, not part of the installed agent: throwaway ZStack-style VMs, writes to
their disks through HMP `qemu-io` (no guest OS needed), and the demo. Used by the tests, the
benchmarks and scripts/demo.sh; run from the repository's root (`python -m testbed.demo`)."""
