"""Entry points of the exec'd plugins `overlay-cni` and `overlay-ipam`.

The only module that touches os.environ, stdin and stdout. It validates locally, answers
VERSION itself, and sends everything else to the node agent over its Unix socket. Imports
are kept to the standard library's cheapest modules: a call should cost little more than
the interpreter's start.
"""

from __future__ import annotations

import posix  # not os: its import costs ~1.3 ms of CPU per exec (_collections_abc, posixpath)
import sys

from cni import jsonc as json
from cni import spec
from cni.spec import CniError

# typing costs ~3 ms of start-up; mypy still reads this block.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    class Reader(Protocol):
        def read(self) -> bytes | str: ...

    class Writer(Protocol):
        def write(self, text: str, /) -> object: ...
        def flush(self) -> None: ...

    Call = Callable[[str, bytes, float], dict[str, object] | None]


def run(
    plugin: str,
    environ: dict[str, str],
    stdin: Reader,
    stdout: Writer,
    call: Call | None = None,
) -> int:
    """One plugin invocation: returns the exit status, writes the result or error to stdout.

    `stdin` has .read() -> bytes|str and `stdout` has .write(str); `call(path, request,
    timeout)` talks to the agent. All are injectable for tests.
    """
    version = spec.CURRENT_VERSION
    try:
        try:
            data = stdin.read()
        except OSError as e:
            raise CniError(spec.IO_FAILURE, f"cannot read the configuration from stdin: {e}") from e
        version = spec.peek_version(data)
        verb = spec.parse_command(environ)
        if verb == "VERSION":
            _emit(stdout, spec.version_info())
            return 0
        from cni import protocol  # not needed by VERSION

        env = spec.parse_env(environ)
        conf = spec.parse_config(plugin, data, verb)
        spec.apply_cni_args(conf, env)  # (to refuse a bad one here; the agent applies it)
        request = protocol.encode_request(verb, plugin, env.to_wire(), conf.raw)
        fd = _open_netns(verb, env.netns) if plugin == "cni" else -1
        try:
            if call is not None:
                result = call(conf.agent_socket, request, conf.timeout_s)
            else:
                fds = (fd,) if fd >= 0 else ()
                result = protocol.call(conf.agent_socket, request, conf.timeout_s, fds)
        except CniError as e:
            if verb == "STATUS" and e.code == spec.TRY_AGAIN_LATER:
                # For STATUS an absent agent means "cannot serve ADD now": code 50.
                raise CniError(spec.NOT_AVAILABLE, e.msg, e.details) from e
            raise
        finally:
            if fd >= 0:
                posix.close(fd)
        if result is not None:
            _emit(stdout, result)
        return 0
    except CniError as e:
        _emit(stdout, e.to_object(version))
        return 1
    except Exception as e:  # never a traceback: the runtime only reads stdout
        msg = f"internal error in overlay-{plugin}: {type(e).__name__}: {e}"
        err = spec.error_object(spec.INTERNAL, msg, "", version)
        _emit(stdout, err)
        return 1


def _open_netns(verb: str, netns: str) -> int:
    """The pod netns opened here, in the runtime's mount namespace, to send to the agent
    (which may not see the runtime's bind mounts). -1 when there is none; a netns that
    cannot be opened is an error except for DEL (best effort: it may be gone)."""
    if not netns or verb not in ("ADD", "CHECK", "DEL"):
        return -1
    try:
        return posix.open(netns, posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError as e:
        if verb == "DEL":
            return -1
        raise CniError(
            spec.INVALID_NETNS,
            f"cannot open CNI_NETNS={netns}: {e.strerror}",
            "the runtime must create the network namespace before ADD",
        ) from e


def _emit(stdout: Writer, obj: dict[str, object]) -> None:
    stdout.write(json.dumps(obj) + "\n")
    stdout.flush()


def _environ() -> dict[str, str]:
    """os.environ's decoding (UTF-8, undecodable bytes kept as surrogates), without os."""
    enc = sys.getfilesystemencoding()
    return {
        k.decode(enc, "surrogateescape"): v.decode(enc, "surrogateescape")
        for k, v in posix.environ.items()
    }


def _main(plugin: str) -> None:
    code = run(plugin, _environ(), sys.stdin.buffer, sys.stdout)
    sys.exit(code)


def main_cni() -> None:
    _main("cni")


def main_ipam() -> None:
    _main("ipam")


if __name__ == "__main__":
    main_cni()
