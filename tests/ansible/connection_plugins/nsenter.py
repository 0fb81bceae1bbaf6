# A connection plugin for hosts made of namespaces (tests/ansible/nshosts.py): what ssh is to a rack host.
# Test-only; production inventories use ssh.
from __future__ import annotations

import os
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

DOCUMENTATION = """
    name: nsenter
    short_description: run tasks inside a namespace host (network, mount and UTS namespaces of a process)
    description:
        - Runs every command with C(nsenter --target PID --net --mount --uts), PID being the process that holds
          the host's namespaces (tests/ansible/nshosts.py), in a clean environment as a login over ssh would
          have (C(env -i) with PATH, HOME, LANG).
        - Files are copied in and out through the host's mount namespace (C(cat) inside the host), so a path
          means what it means on the host (its own /etc, /tmp, /var ...).
        - The controller runs as root; become is not supported (set C(ansible_become=false)).
    author: raftblock
    options:
        pid:
            description: pid of the process holding the host's namespaces
            type: int
            required: true
            vars:
                - name: ansible_nsenter_pid
    extends_documentation_fragment:
        - connection_pipelining
"""

display = Display()

CLEAN_ENV = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "USER=root",
    "LOGNAME=root",
    "SHELL=/bin/sh",
    "LANG=C.UTF-8",
]


class Connection(ConnectionBase):
    transport = "nsenter"
    has_pipelining = True

    def _pid(self) -> int:
        pid = int(self.get_option("pid"))
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            state = "gone"
        if state in ("gone", "Z"):
            raise AnsibleConnectionFailure(f"namespace host {self._play_context.remote_addr}: holder {pid} is gone")
        return pid

    def _argv(self, *command: str) -> list[str]:
        return ["nsenter", f"--target={self._pid()}", "--net", "--mount", "--uts", "--wd=/",
                "env", "-i", *CLEAN_ENV, *command]

    def _connect(self) -> Connection:
        if not self._connected:
            display.vvv(f"NSENTER TARGET {self.get_option('pid')}", host=self._play_context.remote_addr)
            self._pid()
            self._connected = True
        return self

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        argv = self._argv("/bin/sh", "-c", to_text(cmd))
        display.vvv(f"EXEC {to_text(cmd)}", host=self._play_context.remote_addr)
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = p.communicate(in_data)
        return p.returncode, stdout, stderr

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        display.vvv(f"PUT {in_path} TO {out_path}", host=self._play_context.remote_addr)
        if not os.path.exists(to_bytes(in_path, errors="surrogate_or_strict")):
            raise AnsibleFileNotFound(f"file or module does not exist: {in_path}")
        with open(to_bytes(in_path, errors="surrogate_or_strict"), "rb") as src:
            p = subprocess.run(self._argv("/bin/sh", "-c", 'cat > "$1"', "sh", out_path), stdin=src,
                               capture_output=True)
        if p.returncode != 0:
            raise AnsibleError(f"failed to transfer {in_path} to {out_path}: {to_text(p.stderr)}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        display.vvv(f"FETCH {in_path} TO {out_path}", host=self._play_context.remote_addr)
        with open(to_bytes(out_path, errors="surrogate_or_strict"), "wb") as dst:
            p = subprocess.run(self._argv("cat", "--", in_path), stdout=dst, stderr=subprocess.PIPE)
        if p.returncode != 0:
            raise AnsibleError(f"failed to fetch {in_path} to {out_path}: {to_text(p.stderr)}")

    def reset(self) -> None:
        pass

    def close(self) -> None:
        self._connected = False
