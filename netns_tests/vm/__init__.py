"""A qemu micro-VM running a distribution kernel, for tests the host kernel cannot run."""
