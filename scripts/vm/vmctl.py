"""A Debian VM on this machine for the VM scenario (run as root).

Standard library only; used by tests/integration/test_vm.py (``import
vmctl``) and by molecule/vm (the command line)::

    vmctl.py accel                         # kvm or tcg (and why)
    vmctl.py start DIR [--release R] [--netns NAME]
    vmctl.py ssh DIR -- COMMAND...         # runs COMMAND in the VM as root
    vmctl.py reboot DIR                    # systemctl reboot, wait for the new boot
    vmctl.py stop DIR                      # kill qemu, delete the namespace

``start`` builds (or reuses) the cached image (build-image.sh), creates the
network namespace NAME (default ``mcs-vm-<random>``, the names every test
helper here uses), a tap device ``tap0`` inside it with 192.0.2.1/24 and
2001:db8::1/64, a throw-away qcow2 overlay of the image and an SSH key for
this run in DIR, and starts qemu inside the namespace (``ip netns exec``):
the VM's only network is that tap, its address 192.0.2.10 / 2001:db8::10.
qemu boots the image's kernel and initramfs directly, its serial console goes
to DIR/serial.log (the end of it is printed when something fails), and keeps
running the guest across guest reboots. ``start`` returns once the VM accepts
SSH. Nothing happens in this machine's own network namespace.

Acceleration: KVM when /dev/kvm opens and a bounded probe boot (the image's
kernel, up to its "no root" panic, 20 s) finishes under KVM; otherwise TCG
(software emulation, several times slower). A nested KVM that starts but
hangs in early boot thus falls back to TCG. MESHCAPTURE_VM_ACCEL=kvm|tcg
skips the probe. The probe's answer is kept in /run/meshcapture-vm/accel
until this machine reboots.

DIR/vm.json records the namespace, qemu's pid and the paths; DIR/ssh_config
is what ssh (and Ansible: ``ansible_ssh_common_args: -F DIR/ssh_config``)
uses, from inside the namespace: ``ip netns exec NAME ssh -F DIR/ssh_config
vm``.
"""

import argparse
import base64
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VM_V4, VM_V6 = "192.0.2.10", "2001:db8::10"
NS_V4, NS_V6 = "192.0.2.1", "2001:db8::1"
MAC = "52:54:00:c0:00:0a"
ACCEL_CACHE = "/run/meshcapture-vm/accel"
PROBE_TIMEOUT = 20.0


class VMError(RuntimeError):
    pass


def log(msg):
    sys.stderr.write("vm: %s\n" % msg)
    sys.stderr.flush()


def run(argv, check=True, timeout=60, **kwargs):
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.run([str(a) for a in argv], timeout=timeout, universal_newlines=True, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise VMError("%s failed (%d): %s" % (
            " ".join(shlex.quote(str(a)) for a in argv), proc.returncode, (proc.stderr or "").strip()[-2000:]))
    return proc


def unavailable_reason():
    """Why the VM scenario cannot run here, or None."""
    if os.geteuid() != 0:
        return "the VM scenario needs root (network namespaces, tap devices)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (tap devices)"
    for tool in ("ip", "qemu-system-x86_64", "qemu-img", "debootstrap", "ssh", "ssh-keygen", "mke2fs"):
        if not any(os.access(os.path.join(d, tool), os.X_OK)
                   for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]):
            return ("%s not found: run `bash scripts/vm/setup-host.sh` as root "
                    "(installs debootstrap, qemu-system-x86, qemu-utils, dpkg-dev)" % tool)
    return None


def build_image(release="bookworm"):
    """The cached image directory of RELEASE (built when missing)."""
    proc = run(["bash", os.path.join(HERE, "build-image.sh"), release], timeout=3600, stderr=None)
    return proc.stdout.strip().splitlines()[-1]


def _kvm_usable():
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as exc:
        return "cannot open /dev/kvm: %s" % exc.strerror
    os.close(fd)
    return None


def probe_accel(image_dir):
    """("kvm"|"tcg", reason)."""
    forced = os.environ.get("MESHCAPTURE_VM_ACCEL")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise VMError("MESHCAPTURE_VM_ACCEL=%s: must be kvm or tcg" % forced)
        return forced, "MESHCAPTURE_VM_ACCEL=%s" % forced
    problem = _kvm_usable()
    if problem:
        return "tcg", problem
    try:
        with open(ACCEL_CACHE) as handle:
            accel, reason = handle.read().split("\n", 1)
        return accel, reason.strip() + " (cached)"
    except (OSError, ValueError):
        pass
    logfile = "/run/meshcapture-vm/probe-%d.log" % os.getpid()
    os.makedirs(os.path.dirname(logfile), exist_ok=True)
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults",
            "-display", "none", "-no-user-config", "-no-reboot",
            "-kernel", os.path.join(image_dir, "vmlinuz"),
            "-append", "console=ttyS0 panic=-1 root=/dev/meshcapture-no-root", "-serial", "file:" + logfile]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stderr.close()
    try:
        with open(logfile, errors="replace") as handle:
            console = handle.read()
        os.unlink(logfile)
    except OSError:
        console = ""
    took = time.monotonic() - start
    if proc.returncode == 0 and "Kernel panic" in console:
        accel, reason = "kvm", "KVM probe boot finished in %.1fs" % took
    else:
        accel, reason = "tcg", ("KVM probe boot did not finish in %.0fs (%d bytes of console output); "
                                "nested KVM that hangs" % (PROBE_TIMEOUT, len(console)))
    with open(ACCEL_CACHE, "w") as handle:
        handle.write("%s\n%s\n" % (accel, reason))
    return accel, reason


# --------------------------------------------------------------------------


class VM:
    """One VM: its namespace, tap, overlay disk, keys and qemu process."""

    def __init__(self, workdir, release="bookworm", netns=None):
        self.dir = os.path.abspath(workdir)
        self.release = release
        self.netns = netns or "mcs-vm-%s" % secrets.token_hex(3)
        if not self.netns.startswith("mcs-") or "/" in self.netns or " " in self.netns:
            raise VMError("namespace %r: the name must start with mcs-" % self.netns)
        self.image_dir = None
        self.accel = None
        self.accel_reason = None
        self.pid = None
        self.boot_seconds = None

    # -- state file (molecule's playbooks are separate processes)
    @property
    def state_file(self):
        return os.path.join(self.dir, "vm.json")

    def save(self):
        with open(self.state_file, "w") as handle:
            json.dump({"dir": self.dir, "release": self.release, "netns": self.netns, "image_dir": self.image_dir,
                       "accel": self.accel, "accel_reason": self.accel_reason, "pid": self.pid,
                       "boot_seconds": self.boot_seconds}, handle, indent=1)

    @classmethod
    def load(cls, workdir):
        with open(os.path.join(os.path.abspath(workdir), "vm.json")) as handle:
            state = json.load(handle)
        vm = cls(state["dir"], state["release"], state["netns"])
        for key in ("image_dir", "accel", "accel_reason", "pid", "boot_seconds"):
            setattr(vm, key, state[key])
        return vm

    def path(self, name):
        return os.path.join(self.dir, name)

    @property
    def serial_log(self):
        return self.path("serial.log")

    def serial_tail(self, lines=60):
        try:
            with open(self.serial_log, "rb") as handle:
                data = handle.read().decode(errors="replace")
        except OSError:
            return "(no serial log)"
        return "\n".join(data.replace("\r", "").splitlines()[-lines:])

    def ns_argv(self, argv):
        return ["ip", "netns", "exec", self.netns] + [str(a) for a in argv]

    # -- life cycle
    def start(self, boot_timeout=None):
        os.makedirs(self.dir, exist_ok=True)
        self.image_dir = build_image(self.release)
        self.accel, self.accel_reason = probe_accel(self.image_dir)
        log("acceleration: %s (%s)" % (self.accel, self.accel_reason))
        self._keys()
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
             os.path.join(self.image_dir, "disk.qcow2"), self.path("disk.qcow2")])
        self.save()
        run(["ip", "netns", "add", self.netns])
        try:
            self.save()
            for argv in (["ip", "link", "set", "lo", "up"],
                         ["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"],
                         ["ip", "addr", "add", NS_V4 + "/24", "dev", "tap0"],
                         ["ip", "addr", "add", NS_V6 + "/64", "dev", "tap0", "nodad"],
                         ["ip", "link", "set", "tap0", "up"]):
                run(self.ns_argv(argv))
            self._qemu()
            self.wait_ssh(boot_timeout)
        except BaseException:
            sys.stderr.write("vm: serial console (%s), last lines:\n%s\n" % (self.serial_log, self.serial_tail()))
            self.stop()
            raise
        self.save()
        return self

    def _keys(self):
        for name in ("client_key", "client_key.pub"):
            if os.path.exists(self.path(name)):
                os.unlink(self.path(name))
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "meshcapture-vm-test", "-f",
             self.path("client_key")])
        with open(os.path.join(self.image_dir, "host_key.pub")) as handle:
            host_key = " ".join(handle.read().split()[:2])
        with open(self.path("known_hosts"), "w") as handle:
            handle.write("%s %s\n%s %s\n" % (VM_V4, host_key, VM_V6, host_key))
        with open(self.path("ssh_config"), "w") as handle:
            handle.write(
                "Host vm %s %s\n" % (VM_V4, VM_V6)
                + "  HostName %s\n" % VM_V4
                + "  HostKeyAlias %s\n" % VM_V4
                + "  User root\n"
                + "  IdentityFile %s\n" % self.path("client_key")
                + "  IdentitiesOnly yes\n"
                + "  UserKnownHostsFile %s\n" % self.path("known_hosts")
                + "  StrictHostKeyChecking yes\n"
                + "  BatchMode yes\n"
                + "  ConnectTimeout 10\n"
                + "  ServerAliveInterval 5\n"
                + "  ServerAliveCountMax 12\n"
                + "  LogLevel ERROR\n")

    def _qemu(self):
        with open(os.path.join(self.image_dir, "cmdline")) as handle:
            cmdline = handle.read().strip()
        with open(self.path("client_key.pub"), "rb") as handle:
            key = base64.b64encode(handle.read()).decode()
        cmdline += " meshcapture.authorized_key=" + key
        if self.accel == "kvm":
            accel = ["-accel", "kvm", "-cpu", "host"]
        else:
            accel = ["-accel", "tcg,thread=multi", "-cpu", "max"]
        for name in ("serial.log", "qemu.pid"):
            if os.path.exists(self.path(name)):
                os.unlink(self.path(name))
        argv = ["qemu-system-x86_64", "-name", "meshcapture-vm", "-machine", "q35"] + accel + [
            "-smp", "2", "-m", "1024", "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", os.path.join(self.image_dir, "vmlinuz"),
            "-initrd", os.path.join(self.image_dir, "initrd.img"),
            "-append", cmdline,
            "-drive", "file=%s,if=virtio,format=qcow2,cache=unsafe,discard=unmap" % self.path("disk.qcow2"),
            "-netdev", "tap,id=net0,ifname=tap0,script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=net0,mac=%s" % MAC,
            "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0",
            "-serial", "file:" + self.serial_log, "-monitor", "none",
            "-pidfile", self.path("qemu.pid"), "-daemonize"]
        self._boot_started = time.monotonic()
        run(self.ns_argv(argv), timeout=60)
        with open(self.path("qemu.pid")) as handle:
            self.pid = int(handle.read().strip())
        self.save()

    def alive(self):
        if not self.pid:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def default_boot_timeout(self):
        return 180 if self.accel == "kvm" else 600

    def wait_ssh(self, timeout=None, boot_id_not=None):
        """Wait until the VM runs sshd (and, with boot_id_not, a new boot)."""
        timeout = timeout or self.default_boot_timeout()
        start = getattr(self, "_boot_started", time.monotonic())
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise VMError("qemu exited; serial console:\n%s" % self.serial_tail())
            proc = self.ssh("cat /proc/sys/kernel/random/boot_id", check=False, timeout=30, connect_timeout=5)
            boot_id = proc.stdout.strip()
            if proc.returncode == 0 and boot_id and boot_id != boot_id_not:
                self.boot_seconds = round(time.monotonic() - start, 1)
                self.save()
                return boot_id
            last = proc.stderr.strip()
            time.sleep(2)
        raise VMError("no SSH to the VM after %ds (%s); serial console:\n%s" % (timeout, last, self.serial_tail()))

    def ssh_argv(self, command, connect_timeout=None):
        argv = ["ssh", "-F", self.path("ssh_config")]
        if connect_timeout:
            argv += ["-o", "ConnectTimeout=%d" % connect_timeout]
        return self.ns_argv(argv + ["vm", command])

    def ssh(self, command, check=True, timeout=300, input=None, connect_timeout=None):
        """Run a shell command in the VM as root; a CompletedProcess (text)."""
        try:
            proc = subprocess.run(self.ssh_argv(command, connect_timeout), input=input, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            if check:
                raise VMError("ssh %r timed out after %ss" % (command, timeout)) from exc
            return subprocess.CompletedProcess(exc.cmd, 124, "", "timed out")
        if check and proc.returncode != 0:
            raise VMError("in the VM: %r failed (%d): %s%s" % (
                command, proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:]))
        return proc

    def copy_in(self, local_path, remote_path):
        with open(local_path, "rb") as handle:
            data = handle.read()
        subprocess.run(self.ssh_argv("cat > %s" % shlex.quote(remote_path)), input=data, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def reboot(self, timeout=None):
        """systemctl reboot in the VM; returns once the new boot accepts SSH."""
        old = self.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()
        # --no-block: the ssh session ends before the network goes down
        # (else it lingers until its keep-alive gives up).
        self.ssh("systemctl --no-block reboot", check=False, timeout=60)
        self._boot_started = time.monotonic()
        return self.wait_ssh(timeout, boot_id_not=old)

    def stop(self):
        """Kill qemu and delete the namespace; idempotent."""
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if os.path.exists("/run/netns/" + self.netns):
            pids = run(["ip", "netns", "pids", self.netns], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            for dummy in range(50):
                if not run(["ip", "netns", "pids", self.netns], check=False).stdout.split():
                    break
                time.sleep(0.1)
            run(["ip", "netns", "delete", self.netns], check=False)
        self.pid = None
        if os.path.isdir(self.dir):
            self.save()


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("accel")
    p = sub.add_parser("image")
    p.add_argument("--release", default="bookworm")
    p = sub.add_parser("start")
    p.add_argument("dir")
    p.add_argument("--release", default=os.environ.get("MESHCAPTURE_VM_RELEASE", "bookworm"))
    p.add_argument("--netns")
    for name in ("stop", "reboot", "serial"):
        sub.add_parser(name).add_argument("dir")
    p = sub.add_parser("ssh")
    p.add_argument("dir")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cmd == "accel":
        image = build_image("bookworm")
        accel, reason = probe_accel(image)
        print("%s (%s)" % (accel, reason))
    elif args.cmd == "image":
        print(build_image(args.release))
    elif args.cmd == "start":
        reason = unavailable_reason()
        if reason:
            raise VMError(reason)
        vm = VM(args.dir, args.release, args.netns).start()
        print(json.dumps({"netns": vm.netns, "accel": vm.accel, "accel_reason": vm.accel_reason,
                          "boot_seconds": vm.boot_seconds, "dir": vm.dir}))
    elif args.cmd == "stop":
        if os.path.exists(os.path.join(args.dir, "vm.json")):
            VM.load(args.dir).stop()
    elif args.cmd == "reboot":
        vm = VM.load(args.dir)
        vm.reboot()
        print(json.dumps({"boot_seconds": vm.boot_seconds}))
    elif args.cmd == "serial":
        print(VM.load(args.dir).serial_tail(200))
    elif args.cmd == "ssh":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        proc = subprocess.run(VM.load(args.dir).ssh_argv(" ".join(command)), check=False)
        return proc.returncode
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except VMError as exc:
        sys.stderr.write("vmctl: %s\n" % exc)
        sys.exit(1)
