"""The one exception kvmcore raises for a call the kernel would fail."""

import errno as _errno
import os


class KvmError(OSError):
    """A KVM call failed; ``errno`` is the one the kernel returns for the same call.

    ``KvmError(errno.EINVAL, "why")`` reads like the kernel's ``-EINVAL`` with the
    reason spelled out, so a user sees both the errno a VMM would get and what was
    wrong with the input.
    """

    def __init__(self, errno: int, message: str | None = None) -> None:
        super().__init__(errno, message or os.strerror(errno))

    def __str__(self) -> str:
        return f"[{_errno.errorcode.get(self.errno, self.errno)}] {self.strerror}"
