"""Commands about this host and its tools: `hypyr doctor`, `hypyr image`, `hypyr lab`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from hypyr.cli.common import EXIT_ERROR, EXIT_NOT_NATIVE
from hypyr.errors import HypyrError


def add_commands(sub: Any, common: Any) -> None:
    """Add the parsers of `hypyr doctor`, `image` and `lab` to ``sub`` (see hypyr.cli.build_parser)."""
    d = sub.add_parser("doctor", parents=[common], help="check /dev/kvm and say whether guests run natively here")
    d.add_argument("--device", default="/dev/kvm", help=argparse.SUPPRESS)
    d.add_argument("--native", action="store_true",
                   help="print nothing; exit 0 if unmodified guests run natively, 3 if emulated, 1 if no KVM")
    d.add_argument("--backend", action="store_true", help="print only the KVM backend (VT-x, AMD-V, PVM)")
    d.set_defaults(func=cmd_doctor)

    i = sub.add_parser("image", parents=[common], help="the default guest image")
    isub = i.add_subparsers(dest="image_cmd", required=True, metavar="ACTION")
    ib = isub.add_parser("build", help="build (or refresh) the default guest image")
    ib.add_argument("--kernel-deb", metavar="FILE", help="use this Debian kernel package instead of the cloud kernel")
    ib.add_argument("--kernel-package", metavar="NAME",
                    help="fetch this Debian kernel package (e.g. linux-image-6.12-cloud-amd64) and use it")
    ib.add_argument("--dir", metavar="DIR", help="build into DIR instead of the default image's directory")
    ib.add_argument("--force", action="store_true", help="rebuild even if up to date (--system: replace --out)")
    ib.add_argument("--system", action="store_true",
                    help="build a bootable Debian disk image instead (systemd, DHCP, serial login; needs root "
                         "and mmdebstrap; docs/boot.md)")
    ib.add_argument("--out", metavar="FILE", help="--system: the image file (default ~/.cache/hypyr/system/system.img)")
    ib.add_argument("--size", default="2G", help="--system: the image's size (default 2G)")
    ib.add_argument("--root-password", metavar="PW", help="--system: root's password ('-': one line from stdin)")
    ib.add_argument("--ssh-key", metavar="FILE", help="--system: a public key file for root (installs OpenSSH)")
    ib.add_argument("--hostname", default="hypyr", help="--system: the host name (default hypyr)")
    ib.add_argument("--packages", action="append", default=[], metavar="A,B",
                    help="--system: more Debian packages to install (repeatable)")
    isub.add_parser("path", help="print the image directory")
    i.set_defaults(func=cmd_image)

    lab = sub.add_parser("lab", parents=[common],
                         help="run a command inside the nested lab (QEMU TCG with emulated SVM)")
    lab.add_argument("--cpus", type=int, default=2, help="L1 vCPUs (default 2)")
    lab.add_argument("--memory", default="4G", help="L1 memory (default 4G)")
    lab.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="kill the lab (exit 125) if it is still running after this long")
    lab.add_argument("--stall", type=float, metavar="SECONDS",
                     help="kill the lab (exit 125) when L1's heartbeat has not moved for this long "
                          "(it wedged); 0: never (default 240)")
    lab.add_argument("--share", metavar="DIR",
                     help="a host directory the command may write to, at the same path inside the lab "
                          "(the rest of the host is read-only there)")
    lab.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    lab.set_defaults(func=cmd_lab)


def cmd_doctor(args) -> int:
    from hypyr import doctor
    if args.backend:
        print(doctor.kvm_backend())
        return 0
    d = doctor.diagnose(args.device)
    if args.native:
        return 0 if d.usable and d.native else EXIT_NOT_NATIVE if d.usable else EXIT_ERROR
    print("\n".join(doctor.report(d)))
    return 0 if d.usable else EXIT_ERROR


# -- image ----------------------------------------------------------------------------------------
def cmd_image(args) -> int:
    from hypyr.image import build as image
    from hypyr.image import default
    if args.image_cmd == "path":
        print(default.image_dir())
        return 0
    if args.system:   # a bootable Debian disk image (hypyr/image/system.py, docs/boot.md)
        return _image_build_system(args)
    if args.out or args.root_password or args.ssh_key or args.packages:
        raise HypyrError("--out, --root-password, --ssh-key and --packages go with --system")
    if args.dir:   # another image beside the default one (e.g. for a second kernel)
        os.environ["HYPYR_IMAGE_DIR"] = os.path.abspath(args.dir)
    deb = args.kernel_deb
    if deb is not None and args.kernel_package:
        raise HypyrError("give the kernel as --kernel-deb FILE or as --kernel-package NAME, not both")
    if deb is not None and not os.path.isfile(deb):
        raise HypyrError(f"kernel package {deb} does not exist")
    if args.kernel_package:
        from hypyr.image import debs
        deb = debs.download(debs.resolve_package(args.kernel_package))
    paths = image.build(kernel_deb=deb, force=args.force)
    print(paths.dir)
    return 0


def _image_build_system(args) -> int:
    from hypyr.image import system
    if args.kernel_deb or args.kernel_package or args.dir:
        raise HypyrError("--kernel-deb, --kernel-package and --dir are for the default image, not --system")
    pw = args.root_password
    if pw == "-":   # from stdin (asked for on a terminal): keeps the password out of the process list
        if sys.stdin.isatty():
            import getpass
            pw = getpass.getpass("root password for the image: ")
        else:
            pw = sys.stdin.readline().rstrip("\n")
    out = args.out or system.default_out(create_dir=True)
    spec = system.make_spec(out, size=args.size, hostname=args.hostname, root_password=pw,
                            ssh_key_file=args.ssh_key, force=args.force,
                            packages=[p for a in args.packages for p in a.split(",")])
    print(system.build(spec))
    return 0


# -- lab ------------------------------------------------------------------------------------------
def cmd_lab(args) -> int:
    from hypyr import lab
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise HypyrError("give the command to run in the lab after --, e.g. hypyr lab -- hypyr doctor")
    if cmd[0] == "hypyr":  # the same hypyr as this one, whatever PATH says inside the lab
        cmd = [sys.executable, "-m", "hypyr"] + cmd[1:]
    more = {} if args.stall is None else {"stall": args.stall or None}
    return lab.run(cmd, cpus=args.cpus, memory=args.memory, timeout=args.timeout, share=args.share, **more)
